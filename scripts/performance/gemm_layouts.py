"""Each GEMM of a Llama-shaped training step in the memory layouts cuBLAS could be handed, on
this GPU.

    python scripts/performance/gemm_layouts.py [--tokens 32768] [--hidden 2048] [--ffn 8192] \
        [--qkv 3072] [--vocab 32768]

A linear layer y = x W^T (W stored [out, in]) runs three GEMMs a step: the forward (x, W
transposed), the input gradient dy W (both as stored) and the weight gradient dy^T x, which
megabridge adds into the fp32 main_grad (torch.addmm with out_dtype=float32). The first
operand and the second can each be read row by row or column by column: "NT" means the
first as stored and the second transposed. For each GEMM this prints the TFLOP/s of all
four layouts of the same product, the model's own marked with *: a layout that beats the
model's by more than its cost (a transposed copy of the smaller operand, timed at the end for
each weight) is a step's time to win. At the Llama-3.2-1B shape and micro-batch 16 x seq 2048
by default.
"""

from __future__ import annotations

import argparse

import torch
from kernel_speed import timed

LAYOUTS = ("NN", "NT", "TN", "TT")


def operand(rows: int, cols: int, layout: str) -> torch.Tensor:
    """A [rows, cols] bf16 operand, stored as is ("N") or as the transpose of a [cols, rows]
    tensor ("T")."""
    if layout == "N":
        return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    return torch.randn(cols, rows, device="cuda", dtype=torch.bfloat16).t()


def gemm_row(name: str, m: int, n: int, k: int, model: str, fp32_accumulate: bool) -> None:
    """[m, k] @ [k, n] in each layout; with fp32_accumulate, added into an fp32 [m, n]."""
    cells = []
    for layout in LAYOUTS:
        a, b = operand(m, k, layout[0]), operand(k, n, layout[1])
        if fp32_accumulate:
            acc = torch.zeros(m, n, device="cuda")

            def fn(a=a, b=b, acc=acc):
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)

        else:

            def fn(a=a, b=b):
                torch.mm(a, b)

        tflops = 2 * m * n * k / timed(fn) / 1e6
        cells.append(f"{tflops:6.0f}{'*' if layout == model else ' '}")
        del a, b
    print(f"{name:26s} {m:>6d} {n:>6d} {k:>6d}  " + "  ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768, help="micro-batch x sequence")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--qkv", type=int, default=3072, help="the fused QKV projection's outputs")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--blas", choices=("cublas", "cublaslt"), help="torch's preferred BLAS "
                   "library (default: torch's own choice)")  # fmt: skip
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_layouts.py: needs a CUDA GPU")
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    t, h = args.tokens, args.hidden
    linears = {  # name: (in, out)
        "QKV": (h, args.qkv),
        "attention output": (h, h),
        "fc1 (gate and up)": (h, 2 * args.ffn),
        "fc2": (args.ffn, h),
        "logits": (h, args.vocab),
    }
    blas = torch.backends.cuda.preferred_blas_library()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {blas}: TFLOP/s by "
          "layout (* the model's)")  # fmt: skip
    print(f"{'GEMM':26s} {'M':>6s} {'N':>6s} {'K':>6s}  " + "  ".join(f"{x:>7s}" for x in LAYOUTS))
    for name, (fan_in, fan_out) in linears.items():
        gemm_row(f"{name} forward", t, fan_out, fan_in, "NT", False)
        gemm_row(f"{name} input grad", t, fan_in, fan_out, "NN", False)
        gemm_row(f"{name} weight grad", fan_out, fan_in, t, "TN", True)
    # what a layout with the weight in its other order costs, once per backward (fc2's input
    # gradient from such a copy, tried as an option on 2026-12-05, lost end to end: NOTES.md)
    print("\ntransposing copy of each weight [out, in] (us):")
    for name, (fan_in, fan_out) in linears.items():
        w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16)
        print(f"{name:26s} {timed(lambda w=w: w.t().contiguous()):8.1f}")


if __name__ == "__main__":
    main()
