#!/usr/bin/env bash
# Convert and verify a random Llama-shaped HF model (0.3B, bf16, llama3 rope scaling) on this
# machine, on the GPU when there is one: verify in fp32 and bf16, HF -> Megatron checkpoint ->
# HF, and compare the bytes of every tensor.
#   uv run bash scripts/performance/convert_roundtrip_check.sh
set -euo pipefail
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
python3 - "$W/hf" <<'PY'
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=4, vocab_size=32768,
                     max_position_embeddings=131072, rope_scaling=rope, tie_word_embeddings=False)
model = LlamaForCausalLM(config)
for name, p in model.named_parameters():
    if "norm" in name:
        p.data.uniform_(0.5, 1.5)  # norms of ones would hide a mapping that drops them
model.to(torch.bfloat16).save_pretrained(sys.argv[1])
PY
M="python3 -m megabridge"
$M verify --hf-path "$W/hf" --json | tail -1
$M verify --hf-path "$W/hf" --dtype bfloat16 --json | tail -1
/usr/bin/time -f "hf-to-megatron: %e s, %M KiB max RSS" \
    $M convert hf-to-megatron --hf-path "$W/hf" --megatron-path "$W/mcore" 2>&1 | tail -2
$M verify --hf-path "$W/hf" --megatron-path "$W/mcore" --json | tail -1
$M convert megatron-to-hf --megatron-path "$W/mcore" --hf-path "$W/back" 2>&1 | tail -1
python3 - "$W/hf" "$W/back" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def same_bytes(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(
        x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)
    )


a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
exact = a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
print(f"round trip: {len(a)} tensors, bit-exact: {exact}")
sys.exit(0 if exact else 1)
PY
