"""megabridge's Triton kernels (models/triton_kernels.py) against what they replace, on this GPU.

    python scripts/performance/kernel_speed.py [--tokens 32768] [--hidden 2048] [--ffn 8192]
        [--only swiglu rope norm cross_entropy attention fp8 adamw]

At the Llama-3.2-1B shape and micro-batch 16 x seq 2048 by default: SwiGLU forward and
backward (against Megatron-Core's compiled swiglu / swiglu_back; also fc2's input gradient
and SwiGLU's backward in one kernel, per tile config, against cuBLAS + Triton), RoPE on q and k forward
and backward (against the compiled torch function, and for each --rope-rows; also the
model's Q/K/V RoPE out of the fused QKV row), RMSNorm forward and backward, alone and with the
residual add before it (against aten's); the cross entropy's forward and backward (against the
compiled passes it replaces); causal attention under each SDPA backend and q / k / v memory
order (TFLOP/s); FP8's casts of an operand and its transpose, tensorwise and rowwise (against
the separate casts of a transposed copy); AdamW's step over the model's parameters. Launch
constants of the kernels (RoPE's rows, the norm gradient's programs, the cross entropy's and
AdamW's block and warps) are swept beside their defaults. Prints microseconds per call and
the GB/s of the bytes each call must move (its inputs read once, its outputs written once).
The times are the GPU's: each call is queued behind a sleeping kernel (until 2026-12-05 they
were not, and rows through autograd, RoPE's and RMSNorm's, timed the host's bookkeeping as
well). ``--only`` runs some of these sections.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F

SECTIONS = ("swiglu", "rope", "norm", "cross_entropy", "attention", "fp8", "adamw")


HEAD_START_CYCLES = 4_000_000  # ~2 ms of the GPU's clock: longer than any row's host work


def timed(fn, iters: int = 20, head_start: int = HEAD_START_CYCLES) -> float:
    """Median microseconds of the GPU's work in fn() over iters calls, after three warm-up
    calls. Each call's events are queued behind a sleeping kernel (torch.cuda._sleep), so the
    host has launched all of fn's kernels before the GPU reaches the first: the time is the
    kernels' own, not the host's (autograd's bookkeeping around a small kernel takes longer
    than the kernel)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(head_start)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def row(name: str, us: float, nbytes: int) -> None:
    print(f"{name:60s} {us:9.1f} us {nbytes / us / 1e3:8.0f} GB/s")


def swiglu_rows(m: int, f: int) -> None:
    from megatron.core.fusions import fused_bias_swiglu

    from megabridge.models import triton_kernels as tk

    x = torch.randn(m, 2 * f, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, f, device="cuda", dtype=torch.bfloat16)
    io = (3 * f) * m * 2
    row("SwiGLU forward, Megatron compiled", timed(lambda: fused_bias_swiglu.swiglu(x)), io)
    row("SwiGLU forward, Triton", timed(lambda: tk.swiglu(x)), io)
    io = (5 * f) * m * 2
    back = fused_bias_swiglu.swiglu_back
    row("SwiGLU backward, Megatron compiled", timed(lambda: back(g, x)), io)
    row("SwiGLU backward, Triton", timed(lambda: tk.swiglu_grad(g, x)), io)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--batch", type=int, default=16, help="of --tokens, for RoPE's [s, b] rows")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rope-rows", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--vocab", type=int, default=32768, help="for the cross entropy's rows")
    p.add_argument("--layers", type=int, default=16, help="for AdamW's parameters")
    p.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="these rows alone"
    )
    args = p.parse_args()
    m, h, f = args.tokens, args.hidden, args.ffn
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tokens {m}, hidden {h}, ffn {f}"
    )

    s, d = m // args.batch, h // args.heads
    if "swiglu" in args.only:
        swiglu_rows(m, f)
    if "rope" in args.only:
        rope_rows(args, s, d)
    if "norm" in args.only:
        norm_rows(m, h)
    if "cross_entropy" in args.only:
        cross_entropy_rows(m, args.batch, args.vocab)
    if "attention" in args.only:
        attention_rows(args.batch, s, args.heads, args.groups, d)
    if "fp8" in args.only and torch.cuda.get_device_capability() >= (8, 9):
        fp8_cast_rows(m, h)
        fp8_cast_rows(m, f)  # fc2's input, as wide as the FFN
    if "adamw" in args.only:
        adamw_rows(args, h, f, d)


def rope_rows(args, s: int, d: int) -> None:
    from megabridge.models import triton_kernels as tk

    dev, bf16 = "cuda", torch.bfloat16
    freqs = torch.randn(s, 1, 1, d, device=dev)
    compiled = torch.compile(tk.rope_torch, dynamic=None)
    for heads in (args.heads, args.groups):
        t = torch.randn(s, args.batch, heads, d, device=dev, dtype=bf16, requires_grad=True)
        grad = torch.randn_like(t)
        io = 2 * t.numel() * 2 * 2  # forward and backward, each reads t and writes as much

        def step(fn, t=t, grad=grad):
            return lambda: torch.autograd.grad(fn(t, freqs), t, grad)

        row(f"RoPE {heads} heads fwd+bwd, compiled", timed(step(compiled)), io)
        for rows in args.rope_rows:
            with mock.patch.object(tk, "_rope_rows", lambda *_, rows=rows: rows):
                row(f"RoPE {heads} heads fwd+bwd, Triton rows={rows}", timed(step(tk.rope)), io)
        rows = tk._rope_rows(s, args.batch * heads)
        row(f"RoPE {heads} heads fwd+bwd, Triton (chooses {rows})", timed(step(tk.rope)), io)
    qkv_rope_rows(args, s, d)


def qkv_rope_rows(args, s: int, d: int) -> None:
    """The model's RoPE: q, k and v out of Megatron's fused QKV row [s, b, groups, (q heads
    per group + 2) * d] and the gradients back into it (triton_kernels.qkv_rope), against
    the compiled split and RoPE it replaces; the Triton rows per program forced to each
    --rope-rows for q's and k's kernels alike, then as chosen by shape."""
    from megabridge.models import triton_kernels as tk

    per_group = args.heads // args.groups
    split = [per_group * d, d, d]
    mixed = torch.randn(s, args.batch, args.groups, sum(split), device="cuda",
                        dtype=torch.bfloat16, requires_grad=True)  # fmt: skip
    freqs = torch.randn(s, 1, 1, d, device="cuda")
    outs = tk.qkv_rope_torch(mixed, freqs, freqs, split)
    grads = [torch.randn_like(o) for o in outs]
    io = 4 * mixed.numel() * 2  # forward reads the row and writes q, k, v; backward the reverse

    def step(fn):
        return lambda: torch.autograd.grad(fn(mixed, freqs, freqs, split), mixed, grads)

    name = f"Q/K/V RoPE, fused row, {args.heads}/{args.groups} heads, fwd+bwd"
    row(f"{name}, compiled", timed(step(torch.compile(tk.qkv_rope_torch))), io)
    q_rows, k_rows = (tk._rope_rows(s, args.batch * n) for n in (args.heads, args.groups))
    row(f"{name}, Triton (chooses {q_rows} / {k_rows}, {tk._ROPE_WARPS} warps)",
        timed(step(tk.qkv_rope)), io)  # fmt: skip
    for rows in args.rope_rows:
        for warps in (4, 8):
            with mock.patch.multiple(tk, _rope_rows=lambda *_, rows=rows: rows, _ROPE_WARPS=warps):
                row(f"{name}, Triton rows={rows}, {warps} warps", timed(step(tk.qkv_rope)), io)


def norm_rows(m: int, h: int) -> None:
    from megabridge.models import triton_kernels as tk

    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    io = 5 * x.numel() * 2  # forward: x in, y out; backward: x and grad in, dx out

    def norm_step(fn):
        return lambda: torch.autograd.grad(fn(x, w, 1e-5), (x, w), grad)

    row(
        "RMSNorm fwd+bwd, aten", timed(norm_step(lambda *a: F.rms_norm(a[0], (h,), a[1], a[2]))), io
    )
    row("RMSNorm fwd+bwd, Triton", timed(norm_step(tk.rms_norm)), io)
    for per_sm in (2, 8, 16):
        with mock.patch.object(tk, "_NORM_GRAD_PER_SM", per_sm):
            row(f"RMSNorm fwd+bwd, Triton, backward {per_sm} programs/SM",
                timed(norm_step(tk.rms_norm)), io)  # fmt: skip

    # the model's norm: the residual add and the next norm in one kernel each way
    # (models/residual_norm.py); forward reads two and writes two, backward reads three
    # (the norm's gradient, the sum's own, the sum) and writes one
    add = torch.randn_like(x, requires_grad=True)
    grads = (torch.randn_like(x), grad)
    io = 8 * x.numel() * 2

    def add_norm_step(fn):
        return lambda: torch.autograd.grad(fn(x, add, w, 1e-5), (x, add, w), grads)

    def unfused(x, add, w, eps):
        total = x + add
        return total, F.rms_norm(total, (h,), w, eps)

    row("residual add + RMSNorm fwd+bwd, aten", timed(add_norm_step(unfused)), io)
    row("residual add + RMSNorm fwd+bwd, Triton", timed(add_norm_step(tk.add_rms_norm)), io)


def fp8_cast_rows(m: int, h: int) -> None:
    """FP8's casts of an activation [m, h] and its transpose, as a linear's GEMMs need them:
    one pass (triton_kernels.cast_transpose, tensorwise and rowwise) against the amax and
    compiled cast of the operand and of a transposed copy (models/fp8.py); rowwise's two
    amaxes in one read (triton_kernels.row_col_amax) against aten's two reductions."""
    from megabridge.models import fp8
    from megabridge.models import triton_kernels as tk

    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    print(f"FP8 casts of [{m}, {h}]:")
    io = x.numel() * (2 + 1 + 1)  # x read, two FP8 tensors written
    q = fp8._quantize_fn(False)
    for recipe, rowwise in (("tensorwise", False), ("rowwise", True)):

        def separate(rowwise=rowwise):
            q(x, fp8.E4M3, rowwise)
            q(x.t().contiguous(), fp8.E4M3, rowwise)

        def one_pass(rowwise=rowwise):
            fp8._cast_transpose(x, fp8.E4M3, rowwise)

        row(f"FP8 {recipe} cast + transpose, separate", timed(separate), io)
        row(f"FP8 {recipe} cast + transpose, one pass", timed(one_pass), io)

    def two_reductions():
        fp8.amax(x, True)
        torch.linalg.vector_norm(x, float("inf"), dim=0)

    # rowwise's amax of each row and each column (inside the one pass's time above)
    row("FP8 rowwise row + column amax, aten", timed(two_reductions), x.numel() * 2)
    us = timed(lambda: tk.row_col_amax(x))
    row(f"FP8 rowwise row + column amax, Triton ({tk._AMAX_COLS} columns)", us, x.numel() * 2)
    for cols in (128, 256, 512, 2048):  # columns a program reads (128: one tile, no loop)
        with mock.patch.object(tk, "_AMAX_COLS", cols):
            us = timed(lambda: tk.row_col_amax(x))
        row(f"FP8 rowwise row + column amax, {cols} columns", us, x.numel() * 2)


def attention_rows(batch: int, s: int, heads: int, groups: int, d: int) -> None:
    """Causal SDPA forward and backward as the torch spec calls it (models/torch_layers.sdpa:
    [b, heads, s, d] queries, the groups' keys and values, enable_gqa) under each backend torch
    has, and under SDPA's own choice, the model's: 13.5% of the 1.1B step at micro-batch 16 is
    attention (scripts/performance/NOTES.md). TFLOP/s counts causal attention's half of the
    score and value GEMMs, backward 2.5x forward's."""
    from torch.nn.attention import SDPBackend

    from megabridge.models import torch_layers

    flops = 3.5 * 2 * 2 * batch * heads * s * s * d / 2
    backends = [("SDPA's choice", None)] + [
        (name.lower(), getattr(SDPBackend, name))
        for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
    ]
    # Memory order of q, k, v (always passed as [b, n, s, d] views): "bnsd" contiguous;
    # "sbnd" the model's (Megatron's [s, b, n, d] permuted, as TorchAttention._attend gets
    # them); "bsnd" the batch-first order. Each layout under every backend.
    dims = {"b": batch, "s": s, "d": d}  # n: the heads or the groups, per tensor
    for layout in ("bnsd", "sbnd", "bsnd"):

        def made(n, layout=layout):
            t = torch.randn(*(dims.get(c, n) for c in layout), device="cuda", dtype=torch.bfloat16)
            return t.permute(*(layout.index(c) for c in "bnsd")).requires_grad_()

        q, k, v = made(heads), made(groups), made(groups)
        grad = made(heads).detach()

        def step(q=q, k=k, v=v, grad=grad):
            out = torch_layers.sdpa(q, k, v, dropout_p=0.0, scale=None)  # causal, enable_gqa
            return torch.autograd.grad(out, (q, k, v), grad)

        _attention_backends(f"attention {layout} fwd+bwd", step, backends, flops)


def _attention_backends(prefix: str, step, backends, flops: float) -> None:
    from torch.nn.attention import sdpa_kernel

    for name, backend in backends:
        label = f"{prefix}, {name}"
        try:
            if backend is None:
                us = timed(step)
            else:
                with sdpa_kernel([backend]):
                    us = timed(step)
        except RuntimeError as e:  # this backend does not take these inputs here
            print(f"{label:44s} not available: {str(e).splitlines()[0][:60]}")
            continue
        print(f"{label:44s} {us:9.1f} us {flops / us / 1e6:8.0f} TFLOP/s")


def cross_entropy_rows(m: int, batch: int, vocab: int) -> None:
    """The logits-keeping loss forward and backward at TP 1: Triton's one-pass statistics and
    its gradient kernel, against the compiled passes (models/cross_entropy.py)."""
    import torch.distributed as dist

    from megabridge.models import cross_entropy, triton_kernels

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.new_group([0], backend="gloo")
    logits = torch.randn(m // batch, batch, vocab, device="cuda", dtype=torch.bfloat16) * 3
    logits.requires_grad_()
    target = torch.randint(0, vocab, (m // batch, batch), device="cuda")
    io = 3 * logits.numel() * 2  # forward reads the logits; backward reads them, writes as many

    def step():
        loss = cross_entropy.LogitsKeptCrossEntropy.apply(logits, target, group)
        return torch.autograd.grad(loss.sum(), logits)

    with mock.patch.object(triton_kernels, "softmax_stats_fits", lambda t: False):
        row(f"cross entropy fwd+bwd V={vocab}, compiled", timed(step), io)
    chosen = triton_kernels._SOFTMAX_BLOCK, triton_kernels._SOFTMAX_WARPS
    row(f"cross entropy fwd+bwd V={vocab}, Triton ({chosen[0]} entries, {chosen[1]} warps)",
        timed(step), io)  # fmt: skip
    for block in (2048, 4096, 8192):
        for warps in (4, 8, 16):
            if (block, warps) != chosen:
                with mock.patch.multiple(
                    triton_kernels, _SOFTMAX_BLOCK=block, _SOFTMAX_WARPS=warps
                ):
                    row(f"cross entropy fwd+bwd, Triton {block} entries, {warps} warps",
                        timed(step), io)  # fmt: skip


def adamw_rows(args, h: int, f: int, d: int) -> None:
    """The optimizer's step over the model's parameters (--layers of the shape's, embeddings
    untied): triton_kernels.adamw_with_copies as the bf16 training path calls it (fp32 main
    weights held as bf16 weights + int16 remainders, the gradient scale and skip flag read on
    the device), for each elements-a-program and warps-a-program pair beside the default."""
    from megabridge.models import triton_kernels as tk

    layer = [((args.heads + 2 * args.groups) * d, h), (h, h), (2 * f, h), (h, f), (h,), (h,)]
    shapes = [(args.vocab, h), (args.vocab, h), (h,)] + layer * args.layers
    params = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    optimizer.grad_scale = torch.ones((), device="cuda")
    optimizer.found_inf = torch.zeros((), device="cuda")
    copies = {id(p): torch.zeros_like(p, dtype=torch.bfloat16) for p in params}
    remainders = {id(p): torch.zeros_like(p, dtype=torch.int16) for p in params}
    count = sum(p.numel() for p in params)
    io = count * (16 + 12)  # reads bf16, int16, fp32 gradient, m, v; writes all but the gradient
    print(f"AdamW over {len(params)} parameters, {count:,} elements:")

    def step():
        tk.adamw_with_copies(optimizer, copies, remainders)

    chosen = tk._ADAMW_BLOCK, tk._ADAMW_WARPS
    row(f"AdamW, Triton ({chosen[0]} elements, {chosen[1]} warps)", timed(step, 10, 3 * 10**7), io)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if (block, warps) != chosen:
                with mock.patch.multiple(tk, _ADAMW_BLOCK=block, _ADAMW_WARPS=warps):
                    row(f"AdamW, Triton {block} elements, {warps} warps",
                        timed(step, 10, 3 * 10**7), io)  # fmt: skip


if __name__ == "__main__":
    main()
