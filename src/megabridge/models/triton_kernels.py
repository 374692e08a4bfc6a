"""Fused GPU kernels written in Triton, where torch.compile's or aten's were measured slower:
SwiGLU, rotate-half RoPE and RMSNorm (alone, or with the residual add before it:
models/residual_norm.py), each forward and backward; the cross entropy's softmax statistics
and gradient (models/cross_entropy.py); AdamW for bf16 training
(the fp32 weight's update and its bf16 copy in one pass, or the fp32 weight held as the bf16
one and a 16-bit remainder; training/optim.py uses it); and FP8's cast of a matrix and its
transpose in one pass (models/fp8.py; tensorwise, and rowwise with a scale per row of each,
its row and column amaxes from one read).

Measured on the H200 (scripts/performance/NOTES.md, 2026-12-04; Llama 1.1B, micro-batch 16):
- inductor's kernel for SwiGLU's backward (the gate's and the up projection's gradients
  concatenated into one [M, 2f] tensor) took 1.20 ms a layer, twice torchtitan's 0.62 ms
  for the same bytes: a concatenation compiles to one masked load per half and output
  element. Here each program reads g, gate and up once and stores both halves.
- the compiled RoPE computed cos and sin for every element of q and k (198 us a call where
  the bytes take ~50 us). Here each program takes one position and rotates all its heads
  (and batch rows) with one cos / sin of the position's angles.
- aten's RMSNorm backward is two kernels (the input's gradient, then the weight's as a
  column reduction), 0.26 ms a norm. Here one pass over the rows gives both, the weight's
  as per-program partial sums: 0.12 ms (forward 64 us against aten's 84).
Together with the logits-keeping cross entropy: GPU busy 431 -> 413 ms in a 448 ms step.

Each kernel computes in fp32 and rounds once, as inductor's kernels did; the torch functions
next to each kernel are the same math for the CPU, for compiled graphs (inductor fuses them
there) and for machines without Triton. Tests compare the two through Triton's interpreter
(TRITON_INTERPRET=1), which runs these kernels on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS and other machines without Triton: the torch functions run
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t: torch.Tensor) -> bool:
    """Whether t's operation runs as a Triton kernel here: CUDA (or the interpreter), Triton
    installed, and not inside a graph dynamo is tracing (inductor fuses the torch math)."""
    return (
        triton is not None
        and (t.is_cuda or _INTERPRET)
        and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not torch.compiler.is_compiling()
    )


# ---- SwiGLU: h [M, 2f] = [gate | up] -> silu(gate) * up [M, f] -------------------------------


def swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(h, 2, -1)
    return F.silu(gate) * up


def swiglu_grad_torch(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    # d/dgate silu(gate) = sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))); Megatron's order.
    gate, up = torch.chunk(h, 2, -1)
    sig = torch.sigmoid(gate)
    return torch.cat((grad * sig * (1 + gate * (1 - sig)) * up, grad * F.silu(gate)), -1)


_SWIGLU_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _swiglu_kernel(h_ptr, out_ptr, f, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < f
        gate = tl.load(h_ptr + row * 2 * f + cols, mask=mask).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * f + f + cols, mask=mask).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * f + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_grad_kernel(
        grad_ptr, h_ptr, out_ptr, act_ptr, f, BLOCK: tl.constexpr, ACT: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < f
        g = tl.load(grad_ptr + row * f + cols, mask=mask).to(tl.float32)
        gate = tl.load(h_ptr + row * 2 * f + cols, mask=mask).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * f + f + cols, mask=mask).to(tl.float32)
        # (d gate, d up, SwiGLU's output) in fp32, each as the unfused kernels compute it
        sig = tl.sigmoid(gate)
        d_gate = g * sig * (1 + gate * (1 - sig)) * up
        d_up = g * (gate * sig)
        act = gate * sig * up
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * 2 * f + cols, d_gate.to(dtype), mask=mask)
        tl.store(out_ptr + row * 2 * f + f + cols, d_up.to(dtype), mask=mask)
        if ACT:  # SwiGLU's output too, as _swiglu_kernel computes it
            tl.store(act_ptr + row * f + cols, act.to(dtype), mask=mask)


def _swiglu_launch(h: torch.Tensor, grad: torch.Tensor | None = None, act: bool = False):
    """SwiGLU of h [..., 2f] (grad None) or its gradient given grad [..., f]; with ``act``
    (gradient, SwiGLU's output) from the one pass."""
    h = h.contiguous()
    f = h.shape[-1] // 2
    rows = h.numel() // (2 * f)
    grid = (rows, triton.cdiv(f, _SWIGLU_BLOCK))
    if grad is None:
        out = h.new_empty(*h.shape[:-1], f)
        _swiglu_kernel[grid](h, out, f, BLOCK=_SWIGLU_BLOCK)
        return out
    out = torch.empty_like(h)
    output = h.new_empty(*h.shape[:-1], f) if act else out
    _swiglu_grad_kernel[grid](grad.contiguous(), h, out, output, f, BLOCK=_SWIGLU_BLOCK, ACT=act)
    return (out, output) if act else out


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h [..., 2f] (no autograd: the forward of the functions below)."""
    return _swiglu_launch(h) if runs_on(h) else swiglu_torch(h)


def swiglu_grad(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d SwiGLU(h) / d h given grad [..., f] -> [..., 2f]."""
    return _swiglu_launch(h, grad) if runs_on(h) else swiglu_grad_torch(grad, h)


def swiglu_grad_and_output(grad: torch.Tensor, h: torch.Tensor):
    """(swiglu_grad(grad, h), swiglu(h)) from one pass over h and grad."""
    if runs_on(h):
        return _swiglu_launch(h, grad, act=True)
    return swiglu_grad_torch(grad, h), swiglu_torch(h)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return swiglu(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return swiglu_grad(grad, h)


class SwiGLU(torch.nn.Module):
    """SwiGLU as the dense MLP's activation module (Megatron's MLPSubmodules.activation_func,
    applied to fc1's whole output [s, b, 2f / tp]); keeps fc1's output for backward, as
    Megatron's fused SwiGLU does."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return swiglu_torch(h)
        return _SwiGLU.apply(h)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None) -> dict:
        # Megatron's MLP asks each of its modules for its checkpoint entries: none here.
        return {}


# ---- RoPE, rotate-half: t [s, b, n, d], angles [s, 1, 1, rot] (rot <= d, even) --------------


def rope_torch(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x * cos + rotated * sin, rest), dim=-1)


_ROPE_WARPS = 4  # Triton's default; kernel_speed.py sweeps it with the rows


def _rope_rows(positions: int, rows_per_position: int) -> int:
    """(batch row, head) pairs a program takes: the most of 128, 64, 32 that leaves ~4k
    programs, and no more than a position has. kernel_speed.py on the H200 (2026-12-04,
    Llama 1.1B at micro-batch 16): 16 rows a program were 1.6x slower than 128 for q's 32 heads
    and 1.8x slower than 64 for k's 8 (2 KB a program is too little work)."""
    for rows in (128, 64, 32):
        if positions * triton.cdiv(rows_per_position, rows) >= 4096:
            return min(rows, triton.next_power_of_2(rows_per_position))
    return min(16, triton.next_power_of_2(rows_per_position))


if triton is not None:

    @triton.jit
    def _rope_kernel(
        x_ptr,
        freqs_ptr,
        out_ptr,
        copy_ptr,
        copy_out_ptr,
        rows_per_pos,
        heads,
        per_group,
        stride_s,
        stride_b,
        stride_g,
        stride_h,
        out_s,
        out_b,
        out_g,
        out_h,
        freqs_stride,
        d,
        half,
        ROWS: tl.constexpr,
        HALF: tl.constexpr,
        REST: tl.constexpr,
        BACKWARD: tl.constexpr,
        COPY: tl.constexpr,
    ):
        # One position, ROWS of its (batch row, head) pairs; the angles' cos and sin once.
        # Head h of a row sits at group h // per_group, place h % per_group: the strides
        # address a [s, b, n, d] tensor (one group) or the heads inside a fused Q/K/V row.
        pos = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        rmask = r < rows_per_pos
        row, h = r // heads, r % heads
        g, j = h // per_group, h % per_group
        src = pos * stride_s + row * stride_b + g * stride_g + j * stride_h  # [ROWS]
        dst = pos * out_s + row * out_b + g * out_g + j * out_h
        c = tl.arange(0, HALF)
        cmask = c < half
        dtype = out_ptr.dtype.element_ty
        # cos and sin rounded to t's dtype first, as the torch function does.
        f1 = tl.load(freqs_ptr + pos * freqs_stride + c, mask=cmask, other=0.0)
        f2 = tl.load(freqs_ptr + pos * freqs_stride + half + c, mask=cmask, other=0.0)
        cos1 = tl.cos(f1).to(dtype).to(tl.float32)[None, :]
        sin1 = tl.sin(f1).to(dtype).to(tl.float32)[None, :]
        cos2 = tl.cos(f2).to(dtype).to(tl.float32)[None, :]
        sin2 = tl.sin(f2).to(dtype).to(tl.float32)[None, :]
        mask = rmask[:, None] & cmask[None, :]
        x1 = tl.load(x_ptr + src[:, None] + c[None, :], mask=mask).to(tl.float32)
        x2 = tl.load(x_ptr + src[:, None] + half + c[None, :], mask=mask).to(tl.float32)
        if BACKWARD:  # the transpose of the forward's rotation
            o1 = x1 * cos1 + x2 * sin2
            o2 = x2 * cos2 - x1 * sin1
        else:
            o1 = x1 * cos1 - x2 * sin1
            o2 = x2 * cos2 + x1 * sin2
        tl.store(out_ptr + dst[:, None] + c[None, :], o1.to(dtype), mask=mask)
        tl.store(out_ptr + dst[:, None] + half + c[None, :], o2.to(dtype), mask=mask)
        if REST > 0:  # partial rotary: the dimensions past rot pass through
            e = tl.arange(0, REST)
            emask = rmask[:, None] & (e < d - 2 * half)[None, :]
            rest = tl.load(x_ptr + src[:, None] + 2 * half + e[None, :], mask=emask)
            tl.store(out_ptr + dst[:, None] + 2 * half + e[None, :], rest, mask=emask)
        if COPY > 0:  # a second head per row copied as it is, at the same offsets (the value)
            e = tl.arange(0, COPY)
            emask = rmask[:, None] & (e < d)[None, :]
            value = tl.load(copy_ptr + src[:, None] + e[None, :], mask=emask)
            tl.store(copy_out_ptr + dst[:, None] + e[None, :], value, mask=emask)


def _rope_grouped(x, out, freqs, shape, per_group, strides, out_strides, backward: bool, copy=None):
    """Rotate the heads of x into out. shape (s, b, heads, d); a head h lives at group
    h // per_group, place h % per_group; strides and out_strides are (s, b, group, place).
    ``copy`` (source, destination): also copy the heads at the same offsets from one to the
    other (laid out as x and out are)."""
    s, b, n, d = shape
    half = freqs.shape[-1] // 2
    rows = _rope_rows(s, b * n)
    grid = (s, triton.cdiv(b * n, rows))
    copy_src, copy_dst = copy if copy is not None else (x, out)
    _rope_kernel[grid](
        x, freqs, out, copy_src, copy_dst, b * n, n, per_group, *strides, *out_strides,
        freqs.stride(0), d, half, ROWS=rows, HALF=triton.next_power_of_2(half),
        REST=triton.next_power_of_2(d - 2 * half) if d > 2 * half else 0, BACKWARD=backward,
        COPY=triton.next_power_of_2(d) if copy is not None else 0, num_warps=_ROPE_WARPS,
    )  # fmt: skip


def _head_strides(t: torch.Tensor, per_group: int) -> tuple[int, int, int, int]:
    """(s, b, group, place) strides of the heads of a [s, b, n, d] tensor, n = groups x
    per_group."""
    return t.stride(0), t.stride(1), per_group * t.stride(2), t.stride(2)


def _rope_launch(t: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    n = t.shape[2]  # one group of all n heads
    _rope_grouped(t, out, freqs, t.shape, n, _head_strides(t, n), _head_strides(out, n), backward)
    return out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs):
        ctx.save_for_backward(freqs)
        return _rope_launch(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return _rope_launch(grad, freqs, backward=True), None


def rope_fits(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether the kernel takes this call: one fp32 angle row per position, shared by every
    batch row and head (Megatron's [s, 1, 1, rot] layout) and an even rot <= d."""
    return (
        runs_on(t)
        and t.dim() == 4
        and freqs.dim() == 4
        and freqs.dtype == torch.float32
        and freqs.shape[0] == t.shape[0]
        and freqs.shape[1] == freqs.shape[2] == 1
        and freqs.stride(-1) == 1
        and freqs.shape[-1] % 2 == 0
        and freqs.shape[-1] <= t.shape[-1]
        and not freqs.requires_grad
    )


def rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of t [s, b, n, d] by angles [s, 1, 1, rot]: one kernel forward and
    one backward where rope_fits, else the torch function."""
    return _RoPE.apply(t, freqs) if rope_fits(t, freqs) else rope_torch(t, freqs)


# ---- Q/K/V split + RoPE: Megatron's fused QKV row [s, b, ng, (qpg + 2) * hn] -> q, k, v -----


def qkv_rope_torch(mixed, q_freqs, k_freqs, split: list[int]):
    """Megatron-Core's split of the fused QKV projection (per group: qpg query heads, one key,
    one value), then RoPE of q and k: the math of qkv_rope."""
    s, b = mixed.shape[:2]
    query, key, value = torch.split(mixed, split, dim=3)
    query = query.reshape(s, b, -1, key.shape[-1])
    return rope_torch(query, q_freqs), rope_torch(key, k_freqs), value


class _QKVRoPE(torch.autograd.Function):
    """Forward: q and k rotated straight out of the fused row (no copy of the strided query
    view first), v copied out. Backward: the gradients rotated back straight into the fused
    row's gradient (no concatenation of dq, dk, dv after)."""

    @staticmethod
    def forward(ctx, mixed, freqs, per_group: int, head: int):
        s, b, groups = mixed.shape[:3]
        ctx.save_for_backward(freqs)
        ctx.per_group, ctx.head, ctx.mixed_shape = per_group, head, mixed.shape
        q = mixed.new_empty(s, b, groups * per_group, head)
        k = mixed.new_empty(s, b, groups, head)
        row = (mixed.stride(0), mixed.stride(1), mixed.stride(2))
        _rope_grouped(mixed, q, freqs, q.shape, per_group, (*row, head),
                      _head_strides(q, per_group), backward=False)  # fmt: skip
        v = torch.empty_like(k)  # copied by k's kernel: the head after each key in the row
        _rope_grouped(mixed[..., per_group * head :], k, freqs, k.shape, 1, (*row, 0),
                      _head_strides(k, 1), backward=False,
                      copy=(mixed[..., (per_group + 1) * head :], v))  # fmt: skip
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (freqs,) = ctx.saved_tensors
        per_group, head = ctx.per_group, ctx.head
        given = [t for t in (dq, dk, dv) if t is not None]
        # every part of the row is written when all three gradients came back
        make = given[0].new_empty if len(given) == 3 else given[0].new_zeros
        grad = make(ctx.mixed_shape)
        row = (grad.stride(0), grad.stride(1), grad.stride(2))
        if dq is not None:
            if dq.stride(-1) != 1:
                dq = dq.contiguous()
            _rope_grouped(dq, grad, freqs, dq.shape, per_group,
                          _head_strides(dq, per_group), (*row, head), backward=True)  # fmt: skip
        value_grad = grad[..., (per_group + 1) * head :]
        # dv goes into the row with dk's kernel where the two are laid out alike
        together = dk is not None and dv is not None and dk.stride() == dv.stride()
        if dk is not None:
            if dk.stride(-1) != 1:
                dk = dk.contiguous()
                together = False
            _rope_grouped(dk, grad[..., per_group * head :], freqs, dk.shape, 1,
                          _head_strides(dk, 1), (*row, 0), backward=True,
                          copy=(dv, value_grad) if together else None)  # fmt: skip
        if dv is not None and not together:
            value_grad.copy_(dv)
        return grad, None, None, None


def qkv_rope(mixed, q_freqs, k_freqs, split: list[int]):
    """Split Megatron's fused QKV output [s, b, ng, (qpg + 2) * hn] (``split`` = [qpg * hn, hn,
    hn]) into q [s, b, ng * qpg, hn], k and v [s, b, ng, hn], rotating q and k by angles
    [s, 1, 1, rot]: two kernels and a copy forward, the same backward, where the kernel fits;
    else the torch function."""
    head = split[1] if len(split) == 3 else 0
    fits = (
        len(split) == 3
        and split[1] == split[2]
        and split[0] % head == 0
        and mixed.dim() == 4
        and mixed.shape[-1] == sum(split)
        and mixed.stride(-1) == 1
        and q_freqs is k_freqs
        and rope_fits(mixed, q_freqs)
        and q_freqs.shape[-1] <= head
    )
    if not fits:
        return qkv_rope_torch(mixed, q_freqs, k_freqs, split)
    return _QKVRoPE.apply(mixed, q_freqs, split[0] // head, head)


# ---- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over the last dimension --------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, w_ptr, y_ptr, rstd_ptr, h, eps, add_ptr, sum_ptr, ADD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        # ADD: x is a residual add's first operand; the sum (rounded to x's dtype, as aten's
        # add rounds it) is stored and normed.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < h
        x = tl.load(x_ptr + row * h + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            x += tl.load(add_ptr + row * h + cols, mask=mask, other=0.0).to(tl.float32)
            total = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * h + cols, total, mask=mask)
            x = total.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / h + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * h + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_grad_kernel(
        grad_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, h, rows_per_program, add_ptr,
        ADD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # A run of rows: each row's input gradient, and this run's sum of the weight's.
        # ADD: the residual stream's other gradient is added to the input's, after rounding
        # it to the stored dtype (what autograd's bf16 sum of the two would give).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < h
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program  # int64 rows: row * h past 2^31
        for row in range(first, tl.minimum(first + rows_per_program, rows)):
            at = row * h + cols
            x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            wg = w * g
            dx = (wg - x_hat * (tl.sum(wg * x_hat, axis=0) / h)) * rstd
            dx = dx.to(dx_ptr.dtype.element_ty)
            if ADD:
                other = tl.load(add_ptr + at, mask=mask, other=0.0).to(tl.float32)
                dx = (dx.to(tl.float32) + other).to(dx_ptr.dtype.element_ty)
            tl.store(dx_ptr + at, dx, mask=mask)
            dw += g * x_hat
        tl.store(dw_ptr + pid.to(tl.int64) * h + cols, dw, mask=mask)


_RMS_NORM_MAX_BLOCK = 16384  # one row in one program's registers: hidden sizes up to 16k


def _rms_norm_forward(x, weight, eps, add=None):
    """(y, rstd, the normed input) for x [..., h]; with ``add``, x + add is normed and is the
    third: a new contiguous tensor of x's shape (not a view: Megatron's layers pass it on)."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()  # [rows, h]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    total = x2 if add is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    other = x2 if add is None else add.reshape(-1, h).contiguous()
    _rms_norm_kernel[(x2.shape[0],)](
        x2, weight, y, rstd, h, eps, other, total, ADD=add is not None,
        BLOCK=triton.next_power_of_2(h),
    )  # fmt: skip
    return y, rstd, total


def _rms_norm_backward(grad, normed, weight, rstd, add=None):
    """(the input's gradient, plus ``add`` where given; the weight's gradient)."""
    h = normed.shape[-1]
    normed = normed.reshape(-1, h)
    rows = normed.shape[0]
    programs = min(rows, _programs(normed.device))
    dx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    dw = torch.empty(programs, h, dtype=torch.float32, device=normed.device)  # partial sums
    grad2 = grad.reshape(-1, h).contiguous()
    other = grad2 if add is None else add.reshape(-1, h).contiguous()
    _rms_norm_grad_kernel[(programs,)](
        grad2, normed, weight, rstd, dx, dw, rows, h, triton.cdiv(rows, programs), other,
        ADD=add is not None, BLOCK=triton.next_power_of_2(h),
    )  # fmt: skip
    return dx, dw.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd, normed = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(normed, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        dx, dw = _rms_norm_backward(grad, *ctx.saved_tensors)
        return dx, dw, None


class _AddRMSNorm(torch.autograd.Function):
    """(x + add, rms_norm(x + add)): the residual stream and the next sublayer's input."""

    @staticmethod
    def forward(ctx, x, add, weight, eps):
        y, rstd, total = _rms_norm_forward(x, weight, eps, add)
        ctx.save_for_backward(total, weight, rstd)
        ctx.set_materialize_grads(False)
        return total, y

    @staticmethod
    def backward(ctx, grad_total, grad_y):
        if grad_y is None:  # only the sum was used
            return grad_total, grad_total, None, None
        total, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(grad_y, total, weight, rstd, grad_total)
        return dx, dx, dw, None  # the sum's gradient, as aten's add gives it to both


_NORM_GRAD_PER_SM = 4  # runs of rows a multiprocessor takes (kernel_speed.py sweeps it)


def _programs(device: torch.device) -> int:
    # A few runs of rows per SM keep every SM busy; the CPU interpreter takes a few.
    if device.type != "cuda":
        return 4
    return _NORM_GRAD_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., h] with weight [h]: one kernel forward and one backward where
    Triton runs (h up to 16k), else aten's."""
    if rms_norm_fits(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the RMSNorm kernels take x [..., h] and weight [h] here."""
    return runs_on(x) and x.shape[-1] <= _RMS_NORM_MAX_BLOCK and weight.dtype == x.dtype


def add_rms_norm(x: torch.Tensor, add: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + add, rms_norm(x + add, weight)) in one kernel forward and one backward, where
    rms_norm_fits(x, weight) and add is x's shape and dtype (the caller checks). The values
    and both gradients are those of aten's add followed by rms_norm() bit for bit: the sum is
    rounded to x's dtype before it is normed, and the input gradient to its dtype before the
    sum's own gradient is added to it. (In fp32 on a GPU the compiler may fuse that gradient's
    last multiply with the add: one rounding fewer. bf16 and fp16 round in between.)"""
    return _AddRMSNorm.apply(x, add, weight, eps)


# ---- Cross entropy over the vocabulary: each row's softmax statistics in one pass over the
# logits, the gradient in one more (models/cross_entropy.py) ---------------------------------

if triton is not None:

    @triton.jit
    def _softmax_stats_kernel(
        logits_ptr, target_ptr, max_ptr, sum_ptr, picked_ptr, v, stride, BLOCK: tl.constexpr
    ):
        # One row: its max, the sum of exp(x - max) and its target's logit (row's target -1:
        # none here). An online softmax: each lane keeps a running max and a sum rescaled
        # when its max grows; the lanes are combined at the end. One read of the row.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK)
        # a running max starts below every finite logit (and -inf - it is -inf, not NaN)
        lane_max = tl.full([BLOCK], -3.0e38, tl.float32)
        lane_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, v, BLOCK):
            at = start + cols
            x = tl.load(base + at, mask=at < v, other=float("-inf")).to(tl.float32)
            grown = tl.maximum(lane_max, x)
            lane_sum = lane_sum * tl.exp(lane_max - grown) + tl.exp(x - grown)
            lane_max = grown
        row_max = tl.max(lane_max, axis=0)
        tl.store(max_ptr + row, row_max)
        tl.store(sum_ptr + row, tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
        target = tl.load(target_ptr + row)
        picked = tl.load(base + tl.maximum(target, 0)).to(tl.float32)
        tl.store(picked_ptr + row, tl.where(target >= 0, picked, 0.0))

    @triton.jit
    def _softmax_grad_kernel(
        logits_ptr, grad_ptr, max_ptr, sum_ptr, target_ptr, scale_ptr, v, stride,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One row of (softmax - onehot(target)) * the row's loss gradient, in the logits' dtype.
        row = tl.program_id(0).to(tl.int64)
        row_max = tl.load(max_ptr + row)
        total = tl.load(sum_ptr + row)
        target = tl.load(target_ptr + row)
        scale = tl.load(scale_ptr + row)
        cols = tl.arange(0, BLOCK)
        for start in range(0, v, BLOCK):
            at = start + cols
            x = tl.load(logits_ptr + row * stride + at, mask=at < v, other=0.0).to(tl.float32)
            softmax = tl.exp(x - row_max) / total
            grad = (softmax - tl.where(at == target, 1.0, 0.0)) * scale
            tl.store(grad_ptr + row * v + at, grad.to(grad_ptr.dtype.element_ty), mask=at < v)


# vocabulary entries a program holds at a time, and its warps from 2048 entries on (fewer
# entries: 4); kernel_speed.py sweeps both
_SOFTMAX_BLOCK, _SOFTMAX_WARPS = 4096, 8


def _softmax_launch(v: int) -> dict:
    block = min(_SOFTMAX_BLOCK, triton.next_power_of_2(v))
    return dict(BLOCK=block, num_warps=_SOFTMAX_WARPS if block >= 2048 else 4)


def softmax_stats_fits(logits: torch.Tensor) -> bool:
    """Whether softmax_stats / softmax_grad take logits [..., V] here (rows of contiguous
    entries)."""
    return runs_on(logits) and logits.stride(-1) == 1 and logits.dim() >= 2


def softmax_stats(logits: torch.Tensor, target: torch.Tensor):
    """(max, sum of exp(x - max), the target's logit or 0 where target is -1), each fp32 of
    logits' leading shape, for logits [..., V] and target [...] (int64, in [-1, V))."""
    rows = logits.reshape(-1, logits.shape[-1])
    n, v = rows.shape
    out = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3)]
    _softmax_stats_kernel[(n,)](
        rows, target.reshape(-1).contiguous(), *out, v, rows.stride(0), **_softmax_launch(v)
    )  # fmt: skip
    return tuple(t.view(logits.shape[:-1]) for t in out)


def softmax_grad(logits, row_max, sum_exp, target, grad_loss) -> torch.Tensor:
    """(softmax(logits) - onehot(target)) * grad_loss[..., None] in logits' dtype and shape,
    the softmax from softmax_stats' max and sum; target -1: no entry of the row is the
    target."""
    rows = logits.reshape(-1, logits.shape[-1])
    n, v = rows.shape
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    scale = grad_loss.reshape(-1).float().contiguous()
    _softmax_grad_kernel[(n,)](
        rows, grad, row_max.reshape(-1).contiguous(), sum_exp.reshape(-1).contiguous(),
        target.reshape(-1).contiguous(), scale, v, rows.stride(0), **_softmax_launch(v),
    )  # fmt: skip
    return grad


# ---- AdamW on fp32 main weights, their bf16 copies written in the same pass ----------------


if triton is not None:

    @triton.jit
    def _adamw_kernel(
        p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, rem_ptr, n, lr, beta1, beta2, eps, decay,
        corrections_ptr, index, scale_ptr, skip_ptr,
        HAS_OUT: tl.constexpr, HAS_REM: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if HAS_SKIP:  # a skipped step reads and writes nothing
            n = tl.where(tl.load(skip_ptr) == 0, n, 0)
        mask = offs < n
        if HAS_REM:  # the fp32 weight is its bf16 copy's bits and a 16-bit remainder
            high = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.int16, bitcast=True)
            low = tl.load(rem_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
            high = (high.to(tl.int32) & 0xFFFF) - (low >= 0x8000).to(tl.int32)  # rounded up
            param = ((high << 16) | low).to(tl.float32, bitcast=True)
        else:
            param = tl.load(p_ptr + offs, mask=mask, other=0.0)
        grad = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if HAS_SCALE:
            grad = grad / tl.load(scale_ptr)
        exp_avg = tl.load(m_ptr + offs, mask=mask, other=0.0)
        exp_avg_sq = tl.load(v_ptr + offs, mask=mask, other=0.0)
        # torch's fused AdamW's order (ATen fused_adam_utils.cuh, ADAMW mode)
        param = param - lr * decay * param
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        step_size = lr / tl.load(corrections_ptr + 2 * index)
        denom = tl.sqrt(exp_avg_sq) / tl.load(corrections_ptr + 2 * index + 1) + eps
        param = param - step_size * exp_avg / denom
        tl.store(m_ptr + offs, exp_avg, mask=mask)
        tl.store(v_ptr + offs, exp_avg_sq, mask=mask)
        if HAS_REM:  # split again: the high half rounded half away from zero, and the rest
            bits = param.to(tl.int32, bitcast=True)
            low = bits & 0xFFFF
            high = ((bits >> 16) & 0xFFFF) + (low >= 0x8000).to(tl.int32)
            tl.store(out_ptr + offs, high.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
            tl.store(rem_ptr + offs, low.to(tl.int16), mask=mask)
        else:
            tl.store(p_ptr + offs, param, mask=mask)
            if HAS_OUT:
                tl.store(out_ptr + offs, param.to(out_ptr.dtype.element_ty), mask=mask)


_ADAMW_BLOCK, _ADAMW_WARPS = 4096, 4  # a program's elements and warps (kernel_speed.py sweeps)


def adamw_with_copies(
    optimizer: torch.optim.AdamW, copies: dict, remainders: dict | None = None
) -> None:
    """One step of ``optimizer`` (torch's AdamW, its state in torch's format), each fp32
    parameter's update written together with its low-precision copy (``copies``: id of the
    fp32 parameter -> the model's bf16 tensor), where Megatron-Core's mixed-precision
    optimizer casts them in a pass of its own after the step.

    ``remainders`` (id of the fp32 parameter -> an int16 tensor of its shape): those fp32
    weights are not read from the parameter but put together from their bf16 copy and the
    remainder (``join_halves``), and written back the same way (``split_halves``); the
    parameter's own storage is not touched.

    Reads ``optimizer.grad_scale`` and ``optimizer.found_inf`` as torch's fused AdamW does
    (the gradient divided by the scale; nothing changes where found_inf is 1, the step
    counts included), but does not write the divided gradients back.
    """
    remainders = remainders or {}
    scale = getattr(optimizer, "grad_scale", None)
    skip = getattr(optimizer, "found_inf", None)
    for group in optimizer.param_groups:
        if group["amsgrad"] or group["maximize"]:
            raise NotImplementedError("adamw_with_copies: amsgrad / maximize not supported yet")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if not all(p.grad.is_contiguous() for p in params):  # (torch keeps the dtypes equal)
            raise NotImplementedError("adamw_with_copies: strided gradients not supported yet")
        for p in params:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                # (a parameter held as halves has no storage of its own to take strides from)
                state["exp_avg"] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                state["exp_avg_sq"] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        steps = [optimizer.state[p]["step"] for p in params]
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        count = torch.stack(steps)
        # [bias correction 1, sqrt(bias correction 2)] per parameter, from its own count
        corrections = torch.stack([1 - beta1**count, (1 - beta2**count).sqrt()], dim=1)
        for index, p in enumerate(params):
            state, out, rem = optimizer.state[p], copies.get(id(p)), remainders.get(id(p))
            if rem is not None and out is None:
                raise ValueError("adamw_with_copies: a remainder needs its bf16 copy")
            _adamw_kernel[(triton.cdiv(p.numel(), _ADAMW_BLOCK),)](
                p if rem is None else rem, p.grad, state["exp_avg"], state["exp_avg_sq"],
                p if out is None else out, p if rem is None else rem,
                p.numel(), group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                corrections, index, scale if scale is not None else p,
                skip if skip is not None else p,
                HAS_OUT=out is not None, HAS_REM=rem is not None, HAS_SCALE=scale is not None,
                HAS_SKIP=skip is not None, BLOCK=_ADAMW_BLOCK, num_warps=_ADAMW_WARPS,
            )  # fmt: skip
        if skip is not None:
            torch._foreach_sub_(steps, [skip] * len(steps))


# ---- FP8 cast of a matrix and of its transpose in one pass (models/fp8.py) -------------------


if triton is not None:

    @triton.jit
    def _quantizing_scale(amax, largest, ROWWISE: tl.constexpr):
        # fp8.quantizing_scale's arithmetic, rounding for rounding: torch's ``largest / amax``
        # is largest * (1 / amax), its reciprocals IEEE divisions; rowwise keeps the
        # exponent's bits only (the largest power of two at or below)
        scale = tl.math.div_rn(1.0, tl.maximum(amax.to(tl.float32), 1e-12)) * largest
        if ROWWISE:
            scale = (scale.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
        return scale

    @triton.jit
    def _cast_transpose_kernel(
        x_ptr, amax_ptr, amax_t_ptr, out_ptr, out_t_ptr, inverse_ptr, inverse_t_ptr, R, C,
        largest, ROWWISE: tl.constexpr, STORE_X: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # ROWWISE: amax [R] scales x's rows, amax_t [C] its columns (x^T's rows); else one
        # amax [] scales both. STORE_X false: x^T only (out_ptr is not written).
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        if ROWWISE:
            scale = _quantizing_scale(tl.load(amax_ptr + rows, mask=rows < R, other=1.0),
                                      largest, True)  # fmt: skip
            scale_t = _quantizing_scale(tl.load(amax_t_ptr + cols, mask=cols < C, other=1.0),
                                        largest, True)  # fmt: skip
            y = tl.minimum(tl.maximum(x * scale[:, None], -largest), largest)
            y_t = tl.minimum(tl.maximum(x * scale_t[None, :], -largest), largest)
            y_t = y_t.to(out_t_ptr.dtype.element_ty)
            if pid_c == 0:  # the dequantising scales: exact, of powers of two
                tl.store(inverse_ptr + rows, tl.math.div_rn(1.0, scale), mask=rows < R)
            if pid_r == 0:
                tl.store(inverse_t_ptr + cols, tl.math.div_rn(1.0, scale_t), mask=cols < C)
        else:
            scale = _quantizing_scale(tl.load(amax_ptr), largest, False)
            y = tl.minimum(tl.maximum(x * scale, -largest), largest)
            y_t = y.to(out_t_ptr.dtype.element_ty)
            if (pid_r == 0) & (pid_c == 0):
                tl.store(inverse_ptr, tl.math.div_rn(1.0, scale))
        if STORE_X:
            tl.store(out_ptr + rows[:, None] * C + cols[None, :],
                     y.to(out_ptr.dtype.element_ty), mask=mask)  # fmt: skip
        tl.store(out_t_ptr + cols[:, None] * R + rows[None, :], tl.trans(y_t), mask=tl.trans(mask))

    @triton.jit
    def _row_col_amax_kernel(x_ptr, row_part_ptr, col_part_ptr, R, C, COLS: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        # |x|'s largest over BLOCK_R rows x COLS columns: each row's into row_part[pid_c],
        # each BLOCK_C-column tile's columns into col_part[pid_r] (row_col_amax reduces the
        # partials). Compared as int32 float bits: for values >= 0 the bits order as the values
        # do (NaN, 0x7FC00000 once its sign is cleared, above inf, as torch's max keeps it).
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_best = tl.zeros([BLOCK_R], dtype=tl.int32)
        for start in tl.range(0, COLS, BLOCK_C):
            cols = pid_c.to(tl.int64) * COLS + start + tl.arange(0, BLOCK_C)
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
            bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)
            row_best = tl.maximum(row_best, tl.max(bits, axis=1))
            tl.store(col_part_ptr + pid_r.to(tl.int64) * C + cols, tl.max(bits, axis=0),
                     mask=cols < C)  # fmt: skip
        tl.store(row_part_ptr + pid_c.to(tl.int64) * R + rows, row_best, mask=rows < R)


def cast_transpose(
    x: torch.Tensor,
    amax: torch.Tensor,
    dtype: torch.dtype,
    largest: float | None = None,
    amax_t: torch.Tensor | None = None,
    transpose_only: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, C] (contiguous) in ``dtype``, an FP8 format, and x^T [C, R], from one read, as
    fp8.cast computes them: scaled so that ``amax`` maps onto ``largest`` (the format's
    largest value by default). Tensorwise: ``amax`` [] for both. Rowwise (``amax_t`` given):
    ``amax`` [R] scales each row of x and ``amax_t`` [C] each row of x^T (x's columns), by
    powers of two. Returns (x, x^T, dequantising scales of x, of x^T): [] and the same
    tensor twice, or [R, 1] and [C, 1] (float32); with ``transpose_only``, x^T alone is
    written and None is returned for x (its scale still is). torch._scaled_mm's three
    GEMMs of a linear take each operand in one layout and its transpose in the other (aten's
    transposing copy of an FP8 tensor is ~10x slower than the bytes; rowwise, a bf16 copy
    was transposed and cast again)."""
    _check_2d_contiguous(x, "cast_transpose")
    rows, cols = x.shape
    rowwise = amax_t is not None
    out_t = torch.empty((cols, rows), dtype=dtype, device=x.device)
    out = None if transpose_only else torch.empty((rows, cols), dtype=dtype, device=x.device)
    inverse = torch.empty((rows, 1) if rowwise else (), dtype=torch.float32, device=x.device)
    inverse_t = torch.empty((cols, 1), dtype=torch.float32, device=x.device) if rowwise else inverse
    top = torch.finfo(dtype).max if largest is None else largest
    grid = (triton.cdiv(rows, _CAST_BLOCK), triton.cdiv(cols, _CAST_BLOCK))
    _cast_transpose_kernel[grid](
        x, amax.reshape(-1).contiguous(), (amax if amax_t is None else amax_t).reshape(-1).contiguous(),
        out_t if out is None else out, out_t, inverse, inverse_t, rows, cols, top,
        ROWWISE=rowwise, STORE_X=out is not None, BLOCK_R=_CAST_BLOCK, BLOCK_C=_CAST_BLOCK,
    )  # fmt: skip
    return out, out_t, inverse, inverse_t


def row_col_amax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest magnitude in each row [R] and in each column [C] of x [R, C] (contiguous),
    float32, from one read: rowwise FP8's two scales of an operand (fp8.amax of x and of
    x^T, the same values), which two aten reductions read x twice for. The kernel writes
    partial maxima (a 64-row block's per column: 1/32 of x's bytes) that one small reduction
    per output finishes; no atomics (merging every tile's maxima into the outputs by atomic max
    ran no faster than aten's two reductions on the H200). There, 1.34x aten's speed at 8192
    columns, 0.82x at 2048 (scripts/performance/NOTES.md, 2026-12-05)."""
    _check_2d_contiguous(x, "row_col_amax")
    rows, cols = x.shape
    cols_per_program = min(_AMAX_COLS, triton.cdiv(cols, _AMAX_BLOCK_C) * _AMAX_BLOCK_C)
    grid = (triton.cdiv(rows, _AMAX_BLOCK_R), triton.cdiv(cols, cols_per_program))
    row_part = torch.empty((grid[1], rows), dtype=torch.int32, device=x.device)
    col_part = torch.empty((grid[0], cols), dtype=torch.int32, device=x.device)
    _row_col_amax_kernel[grid](
        x, row_part, col_part, rows, cols, COLS=cols_per_program, BLOCK_R=_AMAX_BLOCK_R,
        BLOCK_C=_AMAX_BLOCK_C,
    )  # fmt: skip
    return row_part.amax(0).view(torch.float32), col_part.amax(0).view(torch.float32)


def _check_2d_contiguous(x: torch.Tensor, name: str) -> None:
    if not (runs_on(x) and x.dim() == 2 and x.is_contiguous()):
        raise NotImplementedError(f"{name}: a contiguous 2-D CUDA tensor (not supported yet)")


_CAST_BLOCK = 64
_AMAX_BLOCK_R, _AMAX_BLOCK_C = 64, 128
_AMAX_COLS = 512  # columns a program reads, BLOCK_C at a time


# ---- fp32 weights held as a bf16 weight and a 16-bit remainder --------------------------------
# The bf16 half is the fp32 value's high 16 bits rounded half away from zero (to nearest, ties
# away: round-to-nearest-even's result except at an exact tie), the remainder its low 16 bits.
# Rounding up happened exactly where the low half's top bit is set, so the two give the fp32
# value back bit for bit. _adamw_kernel reads and writes the same format.


def split_halves(x: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> None:
    """Write fp32 ``x`` into ``high`` (bf16) and ``low`` (int16) of its shape."""
    bits = x.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rest = bits & 0xFFFF
    top = (bits >> 16) + (rest >= 0x8000)
    high.copy_(_signed(top, torch.int16).view(torch.bfloat16).view(high.shape))
    low.copy_(_signed(rest, torch.int16).view(low.shape))


def join_halves(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor that ``split_halves`` wrote into ``high`` and ``low``."""
    rest = low.contiguous().to(torch.int64) & 0xFFFF
    top = (high.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF) - (rest >= 0x8000).long()
    return _signed((top << 16) | rest, torch.int32).view(torch.float32)


def _signed(unsigned: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values in [0, 2^bits) (int64) as the signed ``dtype`` (int16, int32) with the same bits."""
    bits = torch.iinfo(dtype).bits
    return torch.where(unsigned >= 2 ** (bits - 1), unsigned - 2**bits, unsigned).to(dtype)
