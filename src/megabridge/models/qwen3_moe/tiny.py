"""Qwen3-MoE's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import MOE

BASE = {**MOE, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4,
        "head_dim": 32, "norm_topk_prob": True}  # fmt: skip

TINY = {
    "base": BASE,  # every layer MoE
    "dense_layer_1": {**BASE, "mlp_only_layers": [1]},
}
