"""Where a compiled FP8 linear's gradients go wrong on the GPU (issue 15).

    python scripts/performance/fp8_inductor_probe.py [--recipe tensorwise] [--only NAME ...]

An FP8 linear (models/fp8.py) between two element-wise ops, compiled, gave gradients at
relative difference 1.0 from eager on an H200 (0.02-0.03 on the CPU). Each case here
compiles the same block one way (dynamo alone, aot_eager, inductor with some of its passes
off; the casts compiled or eager, the GEMMs torch._scaled_mm or float32) and prints the
forward's and both gradients' relative difference from eager, and the gradients' norms (a
norm of 0 says the gradient never arrived). Needs a GPU with FP8 tensor cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from megabridge.models import fp8  # noqa: E402


def block(x, w, recipe):
    """An RMSNorm-like scaling before, SiLU after, as in a layer (the smoke test's block)."""
    h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
    return torch.nn.functional.silu(fp8.fp8_linear(h, w, recipe))


CASES = {
    "dynamo-only": dict(backend="eager"),
    "aot_eager": dict(backend="aot_eager"),
    "aot_eager-fp32-gemm": dict(backend="aot_eager", emulate_gemm=True),
    "aot_eager-plain-quantize": dict(backend="aot_eager", plain_quantize=True),
    "inductor": dict(backend="inductor"),
    "inductor-no-pattern-matcher": dict(backend="inductor", options={"pattern_matcher": False}),
    "inductor-no-fusion": dict(
        backend="inductor", options={"epilogue_fusion": False, "prologue_fusion": False}
    ),
    "inductor-plain-quantize": dict(backend="inductor", plain_quantize=True),
    "inductor-no-pattern-plain-quantize": dict(
        backend="inductor", options={"pattern_matcher": False}, plain_quantize=True
    ),
    "inductor-no-reorder": dict(
        backend="inductor", options={"reorder_for_locality": False, "aggressive_fusion": False}
    ),
}


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipe", choices=fp8.RECIPES, default="tensorwise")
    p.add_argument("--only", nargs="+", choices=sorted(CASES))
    args = p.parse_args()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=gen).cuda().bfloat16()
    w = (torch.randn(48, 32, generator=gen) * 0.1).cuda().bfloat16()
    grad_y = torch.randn(64, 48, generator=gen).cuda().bfloat16()

    def run(fn):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, args.recipe)
        y.backward(grad_y)
        return y.detach(), xi.grad, wi.grad

    ey, ex, ew = run(block)
    print(
        f"eager: |y| {ey.float().norm():.4g} |dx| {ex.float().norm():.4g} |dw| {ew.float().norm():.4g}"
    )
    original, linear = fp8._quantize_fn, fp8.fp8_linear
    for name in args.only or CASES:
        case = dict(CASES[name])
        torch._dynamo.reset()
        fp8._compiled.clear()
        if case.pop("plain_quantize", False):  # the casts eager (the CPU's path)
            fp8._quantize_fn = lambda _emulate: original(True)
        if case.pop("emulate_gemm", False):  # the GEMMs in float32 from the FP8 values
            fp8.fp8_linear = lambda x, w, r: linear(x, w, r, emulate=True)
        try:
            compiled_block = torch.compile(block, dynamic=False, **case)
            cy, cx, cw = run(compiled_block)
            print(f"{name:36s} y {_rel(cy, ey):.3g}  dx {_rel(cx, ex):.3g}  dw {_rel(cw, ew):.3g}  "
                  f"|dx| {cx.float().norm():.4g} |dw| {cw.float().norm():.4g}", flush=True)  # fmt: skip
        except Exception as e:  # one case's failure must not hide the others'
            print(f"{name:36s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        finally:
            fp8._quantize_fn, fp8.fp8_linear = original, linear


if __name__ == "__main__":
    main()
