"""FP8 linear layers without Transformer Engine: torch._scaled_mm behind Megatron's linears.

``model.fp8=tensorwise|rowwise`` makes the torch spec's block linears (QKV, attention
output, MLP in and out; not the embedding or the output layer) multiply in FP8 on GPUs
with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell). Weights, master
weights, gradients and the optimizer stay as they are (bf16 / fp32); each GEMM casts its
two operands to FP8 on the fly with a scale that maps their largest magnitude onto the
format's largest value, multiplies, and the product comes back in bf16, rescaled:

* ``tensorwise``: one scale per tensor. Inputs and weights in e4m3, gradients in e5m2
  (more range, less precision: what torchao's tensorwise recipe does).
* ``rowwise``: one scale per row of the left operand and per column of the right one,
  along the summed dimension, all in e4m3, scales rounded down to a power of two
  (torchao's rowwise recipe): an outlier spoils only its own row.

The three GEMMs of a linear layer, x [M, K] @ W^T (W [N, K]):
forward y = x W^T, input gradient dx = dy W, weight gradient dW = dy^T x.
torch._scaled_mm takes its left operand row-major and its right one column-major, so
each GEMM quantises the layout it needs. On the GPU each operand is quantised once and its
transpose written in the same pass (triton_kernels.cast_transpose; rowwise, the transpose
with a scale per column of the operand); the CPU's emulation casts with fp8.cast,
transposing copies first.
"""

from __future__ import annotations

import functools
import logging

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megabridge.errors import ConfigError
from megabridge.models import compiled, triton_kernels

log = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def quantize(x: torch.Tensor, dtype: torch.dtype, rowwise: bool):
    """x [R, C] -> (x in ``dtype`` [R, C], dequantising scale: [] tensorwise, [R, 1] rowwise).

    x ~= x_fp8.float() * scale. Rowwise takes one scale per row (the amax over C) and
    rounds the multiplier down to a power of two (no overflow, and the scaling is exact).
    """
    return cast(x, amax(x, rowwise), dtype, rowwise)


def amax(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """The largest magnitude of x [R, C]: [] (tensorwise) or [R, 1] (rowwise), in x's dtype.

    One aten reduction kernel, never compiled: inductor's kernel for a whole-tensor
    reduction under symbolic shapes ran on too few blocks (13 ms per 8M-element cast on an
    H200, 95% of an FP8 step; NOTES.md, "the 20x slower FP8").
    """
    if rowwise:
        return torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)
    return torch.linalg.vector_norm(x, float("inf"))


def cast(x: torch.Tensor, x_amax: torch.Tensor, dtype: torch.dtype, rowwise: bool):
    """x [R, C] in ``dtype``, scaled so that ``x_amax`` maps onto the format's largest value;
    -> (x_fp8, dequantising scale). Element-wise only: one fused kernel when compiled."""
    largest = torch.finfo(dtype).max
    scale = quantizing_scale(x_amax, dtype, rowwise)
    x_fp8 = (x.float() * scale).clamp(-largest, largest).to(dtype)
    return x_fp8, scale.reciprocal()


def quantizing_scale(x_amax: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """What x is multiplied by before its cast to ``dtype`` (float32, x_amax's shape): the
    format's largest value over the amax, rounded down to a power of two when rowwise."""
    scale = torch.finfo(dtype).max / x_amax.float().clamp(min=1e-12)  # all zeros: finite
    if rowwise:  # the exponent's bits alone: exact, where log2's rounding could step over
        scale = (scale.view(torch.int32) & 0x7F800000).view(torch.float32)
    return scale


def scaled_mm(a, b, scale_a, scale_b, emulate: bool) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) in bf16: a [M, K] FP8 row-major, b [K, N] FP8
    column-major, scale_a [] or [M, 1], scale_b [] or [1, N] (float32).

    ``emulate``: compute it in float32 from the FP8 values (the CPU tests' reference;
    the GPU kernel accumulates in float32 as well).
    """
    if emulate:
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(torch.bfloat16)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


_compiled: dict = {}


def _quantize_fn(emulate: bool):
    """quantize for the GPU: the amax by aten, the scale and cast as one compiled kernel.

    Its operands reach it detached (``_operand``), so that dynamo sees one kind of tensor:
    an activation that requires grad or is a view of a bigger tensor (the norm's output
    reshaped) guarded it into graphs of its own, 4 graphs for 2 formats in the CPU test.
    """
    if emulate:
        return lambda x, dtype, rowwise: quantize(_operand(x), dtype, rowwise)
    if "quantize" not in _compiled:
        # Symbolic shapes from the start: one kernel per (format, rowwise) for every operand
        # shape (activations, weights, gradients and their transposes) rather than one per
        # shape, which would reach dynamo's recompile limit and fall back to eager.
        compiled_cast = torch.compile(cast, dynamic=True)

        def compiled_quantize(x, dtype, rowwise):
            x = _operand(x)
            return compiled_cast(x, amax(x, rowwise), dtype, rowwise)

        _compiled["quantize"] = compiled_quantize
    return _compiled["quantize"]


def _operand(x: torch.Tensor) -> torch.Tensor:
    """x as quantize's input: detached (no grad, not a view; the same storage, no copy)."""
    return x.detach()


def _cast_transpose(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, transpose_only=False):
    """quantize of x [R, C] and of x^T [C, R] from one read (triton_kernels.cast_transpose):
    (x, x^T in ``dtype``, the dequantising scales of x, of x^T: [] both tensorwise; [R, 1]
    and [C, 1] rowwise, where x^T's rows are x's columns). The values fp8.cast gives x and
    x.t().contiguous(); rowwise, both amaxes come from one more read (row_col_amax).
    ``transpose_only``: x itself is not written (None)."""
    x = _operand(x).contiguous()
    if not rowwise:
        return triton_kernels.cast_transpose(
            x, amax(x, False), dtype, transpose_only=transpose_only
        )
    rows, columns = triton_kernels.row_col_amax(x)  # columns: x^T's rows' amax
    return triton_kernels.cast_transpose(
        x, rows, dtype, amax_t=columns, transpose_only=transpose_only
    )


@functools.cache
def _one_pass_casts_agree(device: torch.device) -> bool:
    """Whether this machine's compiled cast_transpose gives fp8.cast's FP8 values and scales
    (checked once per device, in both recipes and formats, as the interpreter's tests cannot
    see a GPU compiler's code); if not, the separate casts run and a warning says so."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(96, 80, generator=gen) * 3).to(device, torch.bfloat16)
    agree = True
    for dtype, rowwise in ((E4M3, False), (E5M2, False), (E4M3, True)):
        out, out_t, scale, scale_t = _cast_transpose(x, dtype, rowwise)
        for got, got_scale, rows in ((out, scale, x), (out_t, scale_t, x.t().contiguous())):
            want, want_scale = quantize(rows, dtype, rowwise)
            agree &= torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            agree &= torch.equal(got_scale, want_scale)
        _, only_t, _, only_scale_t = _cast_transpose(x, dtype, rowwise, transpose_only=True)
        agree &= torch.equal(only_t.view(torch.uint8), out_t.view(torch.uint8))
        agree &= torch.equal(only_scale_t, scale_t)
    if not agree:
        log.warning("the Triton FP8 casts disagree with torch on %s; the separate casts run "
                    "instead", device)  # fmt: skip
    return bool(agree)


def _forward_operand(x: torch.Tensor, rowwise: bool, transposed: bool, emulate: bool):
    """x (an input or a weight) for the forward GEMM, e4m3: (x_fp8, its scale, what backward
    keeps of it for its own GEMM, read by _backward_operand). With ``transposed`` (on the GPU)
    x^T is cast in the same pass and kept in FP8; else tensorwise keeps x_fp8 (half the bytes
    of x) and rowwise keeps x itself (backward scales it over the other dimension)."""
    if transposed:
        x_fp8, xt_fp8, x_scale, xt_scale = _cast_transpose(x, E4M3, rowwise)
        return x_fp8, x_scale, (xt_fp8, xt_scale)
    # quantize takes x detached (_operand): dynamo keeps a Parameter's shape static, so each
    # layer's weight shape would compile anew, past the recompile limit (measured: eager
    # fallback, 0.78x)
    x_fp8, x_scale = _quantize_fn(emulate)(x, E4M3, rowwise)  # [R, C], [] or [R, 1]
    return x_fp8, x_scale, ((x,) if rowwise else (x_fp8, x_scale))


def _kept_for_backward(x: torch.Tensor, rowwise: bool, transposed: bool, emulate: bool):
    """What _forward_operand keeps of x, without x's own cast where the one-pass casts run:
    x^T in e4m3 and its scale (fc2's recomputed SwiGLU output, which no forward GEMM takes)."""
    if transposed:
        _, xt_fp8, _, xt_scale = _cast_transpose(x, E4M3, rowwise, transpose_only=True)
        return xt_fp8, xt_scale
    return _forward_operand(x, rowwise, transposed, emulate)[2]


def _backward_operand(kept: tuple, rowwise: bool, transposed: bool, emulate: bool):
    """x^T in e4m3 and its scale, from what _forward_operand kept of x."""
    if transposed:
        return kept
    if rowwise:
        (x,) = kept
        return _quantize_fn(emulate)(x.t().contiguous(), E4M3, True)  # scaled over x's rows' axis
    x_fp8, x_scale = kept
    return x_fp8.t().contiguous(), x_scale


def _gradient_operands(grad_y: torch.Tensor, rowwise: bool, transposed: bool, emulate: bool):
    """dy [M, N] and dy^T in FP8 (rowwise e4m3, each over its own rows; tensorwise e5m2, one
    scale): (g_fp8, g_scale, gt_fp8, gt_scale)."""
    dtype = E4M3 if rowwise else E5M2  # tensorwise: the range of e5m2 for gradients
    if transposed:
        g_fp8, gt_fp8, g_scale, gt_scale = _cast_transpose(grad_y, dtype, rowwise)
        return g_fp8, g_scale, gt_fp8, gt_scale
    q = _quantize_fn(emulate)
    g_fp8, g_scale = q(grad_y, dtype, rowwise)
    if rowwise:
        return (g_fp8, g_scale, *q(grad_y.t().contiguous(), dtype, True))
    return g_fp8, g_scale, g_fp8.t().contiguous(), g_scale


def _uses_one_pass_casts(x: torch.Tensor, emulate: bool) -> bool:
    """On the GPU: each operand and its transpose in one pass (what backward multiplies kept)."""
    return not emulate and triton_kernels.runs_on(x) and _one_pass_casts_agree(x.device)


def _fp8_forward(x, weight, rowwise: bool, transposed: bool, emulate: bool):
    """y = x W^T, both cast to e4m3 -> (y in bf16, what backward keeps of x, of W)."""
    x_fp8, x_scale, x_kept = _forward_operand(x, rowwise, transposed, emulate)
    w_fp8, w_scale, w_kept = _forward_operand(weight, rowwise, transposed, emulate)
    y = scaled_mm(x_fp8, w_fp8.t(), x_scale, w_scale.t().contiguous(), emulate)
    return y, x_kept, w_kept


def _grad_input(grads: tuple, w_kept: tuple, rowwise: bool, transposed: bool, emulate: bool):
    """dx [M, K] = dy [M, N] @ W [N, K]: W column-major is W^T [K, N] row-major, transposed."""
    g_fp8, g_scale, _, _ = grads
    wt_fp8, wt_scale = _backward_operand(w_kept, rowwise, transposed, emulate)
    return scaled_mm(g_fp8, wt_fp8.t(), g_scale, wt_scale.t().contiguous(), emulate)


def _grad_weight(grads: tuple, x_kept: tuple, rowwise: bool, transposed: bool, emulate: bool):
    """dW [N, K] = dy^T [N, M] @ x [M, K]."""
    _, _, gt_fp8, gt_scale = grads
    xt_fp8, xt_scale = _backward_operand(x_kept, rowwise, transposed, emulate)
    return scaled_mm(gt_fp8, xt_fp8.t(), gt_scale, xt_scale.t().contiguous(), emulate)


class FP8Linear(torch.autograd.Function):
    """y = x W^T with the three GEMMs in FP8. x [M, K], W [N, K] (bf16) -> y [M, N] bf16."""

    @staticmethod
    def forward(ctx, x, weight, recipe: str, emulate: bool):
        ctx.rowwise, ctx.dtypes = recipe == "rowwise", (x.dtype, weight.dtype)
        ctx.transposed, ctx.emulate = _uses_one_pass_casts(x, emulate), emulate
        y, x_kept, w_kept = _fp8_forward(x, weight, ctx.rowwise, ctx.transposed, emulate)
        ctx.save_for_backward(*x_kept, *w_kept)
        ctx.x_count = len(x_kept)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        x_kept, w_kept = saved[: ctx.x_count], saved[ctx.x_count :]
        how = (ctx.rowwise, ctx.transposed, ctx.emulate)
        grads = _gradient_operands(grad_y.contiguous(), *how)
        grad_x = _grad_input(grads, w_kept, *how)
        grad_w = _grad_weight(grads, x_kept, *how)
        return grad_x.to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None


class FP8SwiGLUThenLinear(torch.autograd.Function):
    """y = SwiGLU(h) W^T with FP8 GEMMs (FP8Linear's), keeping h and what backward needs of
    W, not SwiGLU's output a: backward recomputes a with SwiGLU's gradient (one pass over h,
    as swiglu_recompute's bf16 function does) and casts it again for the weight gradient,
    the same FP8 values as forward's (on the GPU its transpose alone, which that GEMM
    takes). h [M, 2f], W [N, f] -> y [M, N]."""

    @staticmethod
    def forward(ctx, h, weight, recipe: str, emulate: bool):
        ctx.rowwise, ctx.dtypes = recipe == "rowwise", (h.dtype, weight.dtype)
        a = triton_kernels.swiglu(h)
        ctx.transposed, ctx.emulate = _uses_one_pass_casts(a, emulate), emulate
        y, _, w_kept = _fp8_forward(a, weight, ctx.rowwise, ctx.transposed, emulate)
        ctx.save_for_backward(h, *w_kept)
        return y.to(h.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        h, *w_kept = ctx.saved_tensors
        how = (ctx.rowwise, ctx.transposed, ctx.emulate)
        grads = _gradient_operands(grad_y.contiguous(), *how)
        grad_a = _grad_input(grads, tuple(w_kept), *how).to(h.dtype)
        grad_h, a = triton_kernels.swiglu_grad_and_output(grad_a, h)
        grad_w = _grad_weight(grads, _kept_for_backward(a, *how), *how)
        return grad_h, grad_w.to(ctx.dtypes[1]), None, None


def fp8_linear(x, weight, recipe: str, emulate: bool = False) -> torch.Tensor:
    """x [..., K] @ weight^T (weight [N, K]) -> [..., N], the GEMMs in FP8."""
    flat = x.reshape(-1, x.shape[-1])
    return FP8Linear.apply(flat, weight, recipe, emulate).view(*x.shape[:-1], weight.shape[0])


def check_fp8_supported(recipe: str, tensor_parallel: int, sequence_parallel: bool) -> None:
    """Raise ConfigError (one line) where model.fp8 cannot run; else return."""
    if recipe not in RECIPES:
        raise ConfigError(f"model.fp8={recipe!r}: expected one of {', '.join(RECIPES)}")
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.fp8 is not supported yet without a GPU (it needs FP8 tensor cores, "
            "compute capability 8.9+)"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(
            f"model.fp8 needs FP8 tensor cores (compute capability 8.9+); "
            f"this GPU is {major}.{minor}"
        )
    if tensor_parallel > 1 or sequence_parallel:
        raise ConfigError("model.fp8 with tensor parallelism is not supported yet")


class _FP8Forward:
    """Megatron's linear forward (_forward_impl) with the GEMM in FP8.

    Megatron calls it with the bias (column-parallel layers only) and its TP and
    gradient-fusion switches; check_fp8_supported allows TP 1 only, where the
    switches are off and the layer is a plain linear (frozen weights, LoRA's base,
    keep Megatron's own path).
    """

    def __init__(self, *args, fp8_recipe: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp8_recipe = fp8_recipe

    def _forward_impl(self, input, weight, bias=None, *args, **kwargs):
        if not weight.requires_grad:
            return super()._forward_impl(input, weight, bias, *args, **kwargs)
        # On the CPU (tests only: check_fp8_supported refuses it for runs) the GEMMs are emulated.
        out = fp8_linear(input, weight, self.fp8_recipe, emulate=not input.is_cuda)
        return out if bias is None else out + bias


class FP8ColumnParallelLinear(_FP8Forward, ColumnParallelLinear):
    bf16_class = ColumnParallelLinear  # what the torch spec has in its place without FP8


class FP8RowParallelLinear(_FP8Forward, compiled.RowParallelLinear):
    bf16_class = compiled.RowParallelLinear


FP8_CLASS_OF = {
    ColumnParallelLinear: FP8ColumnParallelLinear,
    RowParallelLinear: FP8RowParallelLinear,
}
