"""Time and peak memory of converting an MXFP4 GPT-OSS checkpoint at the published shape.

A random checkpoint with gpt-oss-20b's (or -120b's) real dimensions, fewer layers, stored
as the official one is (experts as MXFP4 ``*_blocks`` + ``*_scales``, bf16 elsewhere), is
converted to a Megatron checkpoint (experts dequantized while streaming) and back to an HF
folder (bf16 experts). Runs on the CPU.

    uv run python scripts/performance/gpt_oss_mxfp4_convert.py --size 20b --layers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from conversion_speed import measure  # this folder's conversion benchmark
from safetensors.torch import save_file

SHAPES = {"20b": 32, "120b": 128}  # experts a layer; the rest is the same in both
HIDDEN, FFN, HEADS, KV, HEAD_DIM, VOCAB = 2880, 2880, 64, 8, 64, 201088


def make_gpt_oss(folder: Path, experts: int, layers: int) -> int:
    """The checkpoint, one safetensors file per layer (as big as the official shards)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def mxfp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen)
        scales = torch.randint(118, 126, (experts, rows, cols // 32), generator=gen)
        return blocks.to(torch.uint8), scales.to(torch.uint8)

    files = {"model-embed.safetensors": {"model.embed_tokens.weight": rand(VOCAB, HIDDEN),
             "model.norm.weight": rand(HIDDEN), "lm_head.weight": rand(VOCAB, HIDDEN)}}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": rand(HIDDEN),
             p + "post_attention_layernorm.weight": rand(HIDDEN),
             p + "self_attn.sinks": rand(HEADS), p + "mlp.router.weight": rand(experts, HIDDEN),
             p + "mlp.router.bias": rand(experts),
             p + "mlp.experts.gate_up_proj_bias": rand(experts, 2 * FFN),
             p + "mlp.experts.down_proj_bias": rand(experts, HIDDEN)}  # fmt: skip
        for proj, rows in (("q", HEADS * HEAD_DIM), ("k", KV * HEAD_DIM), ("v", KV * HEAD_DIM)):
            t[p + f"self_attn.{proj}_proj.weight"] = rand(rows, HIDDEN)
            t[p + f"self_attn.{proj}_proj.bias"] = rand(rows)
        t[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        t[p + "self_attn.o_proj.bias"] = rand(HIDDEN)  # fmt: skip
        for name, (rows, cols) in (
            ("gate_up_proj", (2 * FFN, HIDDEN)),
            ("down_proj", (HIDDEN, FFN)),
        ):
            t[p + f"mlp.experts.{name}_blocks"], t[p + f"mlp.experts.{name}_scales"] = mxfp4(rows, cols)  # fmt: skip
        files[f"model-layer{i}.safetensors"] = t
    weight_map = {}
    for file, tensors in files.items():
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
              "num_local_experts": experts, "num_experts_per_tok": 4, "sliding_window": 128,
              "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 150000,
              "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 4096},
              "swiglu_limit": 7.0, "attention_bias": True, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--size", choices=sorted(SHAPES), default="20b")
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    megabridge = [sys.executable, "-m", "megabridge", "convert"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = make_gpt_oss(root / "hf", SHAPES[args.size], args.layers)
        to_s, to_mem = measure([*megabridge, "hf-to-megatron", "--hf-path", str(root / "hf"),
                                "--megatron-path", str(root / "mg")])  # fmt: skip
        back_s, back_mem = measure([*megabridge, "megatron-to-hf", "--megatron-path", str(root / "mg"),
                                    "--hf-path", str(root / "back")])  # fmt: skip
        back = sum(f.stat().st_size for f in (root / "back").glob("*.safetensors"))
    gib = 2**30
    print(f"gpt-oss-{args.size} shape, {args.layers} layers: MXFP4 checkpoint {size / gib:.2f} GiB, "
          f"exported bf16 {back / gib:.2f} GiB")  # fmt: skip
    print(f"hf-to-megatron (dequantizing): {to_s:6.1f} s, peak PSS {to_mem / gib:5.2f} GiB")
    print(f"megatron-to-hf (bf16 experts): {back_s:6.1f} s, peak PSS {back_mem / gib:5.2f} GiB")


if __name__ == "__main__":
    main()
