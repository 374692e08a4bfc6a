"""Packed (THD) attention on the GPU: torch's varlen flash kernel against one SDPA call per segment.

    python scripts/performance/packed_attention.py [--seq 4096] [--mean-len 256]

The torch spec's packed path (models/torch_layers.SDPAttention) uses the varlen kernel
where torch has one; the per-segment loop is its fallback. Both run here on the same
random segments of a Llama-3.2-1B attention shape (32 query heads, 8 K/V heads, head dim
64), forward + backward, bf16; the median of --iters timed runs after --warmup.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq", type=int, default=4096, help="tokens per packed sequence")
    p.add_argument("--mean-len", type=int, default=256, help="mean segment length")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("packed_attention.py needs a GPU")
    from megatron.core.packed_seq_params import PackedSeqParams

    from megabridge import runtime
    from megabridge.models import torch_layers
    from megabridge.models.provider import transformer_config
    from megabridge.training.config import ModelConfig

    runtime.init_distributed()
    runtime.init_model_parallel(1, 1)
    cfg = ModelConfig(num_layers=1, hidden_size=2048, num_attention_heads=32, num_query_groups=8)
    attn = torch_layers.SDPAttention(
        transformer_config(cfg), layer_number=1, attn_mask_type=None, attention_type="self"
    )
    gen = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < args.seq:
        lengths.append(int(torch.randint(8, 2 * args.mean_len, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - args.seq
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.cuda(), cu_seqlens_kv=cu.cuda(),
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))  # fmt: skip
    q = torch.randn(args.seq, 32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(args.seq, 8, 64, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))  # fmt: skip

    def run() -> torch.Tensor:
        out = attn(q, k, v, None, packed_seq_params=params)
        out.float().square().mean().backward()
        return out.detach()

    def timed() -> tuple[float, torch.Tensor]:
        times = []
        for i in range(args.warmup + args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run()
            end.record()
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(start.elapsed_time(end))
        return statistics.median(times), out

    varlen_ms, varlen_out = timed()
    with mock.patch.object(torch_layers, "varlen_supported", return_value=False):
        loop_ms, loop_out = timed()
    diff = (varlen_out.float() - loop_out.float()).abs().max().item()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {len(lengths)} segments "
          f"in {args.seq} tokens (mean {args.seq / len(lengths):.0f}), fwd+bwd bf16")  # fmt: skip
    print(f"varlen kernel {varlen_ms:.2f} ms | per-segment SDPA {loop_ms:.2f} ms | "
          f"{loop_ms / varlen_ms:.1f}x | max |diff| {diff:.1e}")  # fmt: skip
    runtime.shutdown()


if __name__ == "__main__":
    main()
