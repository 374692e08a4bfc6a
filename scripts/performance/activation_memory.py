"""Bytes saved for backward per token and layer, by the part of the layer that keeps them.

    python scripts/performance/activation_memory.py                      # today's torch spec
    python scripts/performance/activation_memory.py --variant lean:model.recompute_swiglu=true
    python scripts/performance/activation_memory.py --shape 1b --seq 256  # the 1.1B widths

One forward of a small Llama-shaped model (default: 2 layers at tiny widths; ``--shape 1b``:
2 layers at the 1.1B shape's widths, hidden 2048, FFN 8192, 32 heads, 8 KV groups, vocab 32768)
under models/activation_memory.SavedTensorLog, in bf16 (on the CPU; on CUDA where there is
one). Prints each layer part's bytes per token and layer, what it saved (shape, dtype), the
bytes kept outside the layers per token (the loss among them), and each variant's total.

On a GPU machine the same command measures the CUDA path (the model is built on the GPU;
compiled kernels' saved tensors pass through the same hooks):

    PYTHONPATH=<site>:src python3 scripts/performance/activation_memory.py --shape 1b --seq 2048

What the CPU cannot show (the GPU runs other code there; see NOTES.md, 2026-12-03 perfmem):
the RMSNorm in bf16 runs unfused here (fp32 copies) and fused on CUDA (input + fp32 rstd);
grouped-query SDPA repeats K/V on the CPU (copies) and takes them as they are on CUDA (V a
view of the QKV output, keeping all of it); RoPE, SwiGLU and the cross entropy are compiled
on CUDA only.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

SHAPES = {
    "tiny": dict(hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
                 num_query_groups=2, vocab_size=4096),
    "1b": dict(hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
               num_query_groups=8, vocab_size=32768),
}  # fmt: skip


def measure(overrides: dict, shape: str, seq: int, mbs: int, layers: int):
    """(log, tokens) after one forward + loss of the model with ``overrides``."""
    from megabridge.models import init as weight_init
    from megabridge.models.activation_memory import SavedTensorLog
    from megabridge.models.config import ModelConfig
    from megabridge.models.provider import build_model

    cfg = ModelConfig(num_layers=layers, seq_length=seq, bf16=True, transformer_impl="torch",
                      share_embeddings_and_output_weights=False, **SHAPES[shape])  # fmt: skip
    for key, value in overrides.items():
        setattr(cfg, key, value)
    (model,) = build_model(cfg)
    weight_init.initialize([model], cfg, seed=0)
    device = next(model.parameters()).device  # CUDA where there is one (provider)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=gen).to(device)
    positions = torch.arange(seq, device=device).expand(mbs, -1)
    with SavedTensorLog(model) as log:
        model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])  # per-token loss [b, s]
    return log, mbs * seq


def _report(label: str, log, tokens: int, layers: int) -> int:
    from megabridge.models.activation_memory import layer_part, outside_layers_bytes

    per = tokens * layers
    print(f"\n== {label}: bytes per token and layer, by layer part")
    total = 0
    rows: dict[str, list] = {}
    for s in log.saved.values():
        part = layer_part(s.module)
        if part is not None:
            rows.setdefault(part, []).append(s)
    for part, saved in sorted(rows.items()):
        nbytes = sum(s.nbytes for s in saved)
        total += nbytes
        kinds = sorted({f"{list(s.shape)} {str(s.dtype)[6:]}" for s in saved if s.nbytes})
        print(f"  {part:42s} {nbytes / per:9.1f}  {'; '.join(kinds)[:110]}")
    print(f"  {'total per token and layer':42s} {total / per:9.1f}")
    for module, nbytes in sorted(outside_layers_bytes(log).items()):
        print(f"  outside: {module:33s} {nbytes / tokens:9.1f} per token")
    return total // per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:field=value[,...]")
    args = p.parse_args()

    from megabridge import runtime
    from megabridge.models.config import ModelConfig
    from megabridge.training.config import parse_value

    runtime.init_distributed()
    runtime.init_model_parallel(1, 1)
    runtime.seed_everything(0)
    types = typing.get_type_hints(ModelConfig)
    variants = [("today", {})]
    for text in args.variant:
        label, _, body = text.partition(":")
        pairs = (item.split("=", 1) for item in body.split(",") if item)
        fields = {k.removeprefix("model."): v for k, v in pairs}
        variants.append((label, {k: parse_value(v, types[k]) for k, v in fields.items()}))
    totals = []
    for label, overrides in variants:
        log, tokens = measure(overrides, args.shape, args.seq, args.mbs, args.layers)
        totals.append((label, _report(label, log, tokens, args.layers)))
    print("\nper token and layer: " + ", ".join(f"{k} {v} B" for k, v in totals))


if __name__ == "__main__":
    main()
