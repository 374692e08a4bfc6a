"""Seed-OSS: Llama's layout with biases on q, k and v (not o_proj, not the MLP) and a head
dimension that is not hidden / heads."""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge


@register_bridge
class SeedOssBridge(FamilyBridge):
    family = "seed_oss"
    architectures = ("SeedOssForCausalLM",)
    hf_model_type = "seed_oss"
    NAME = "Seed-OSS"
    # attention_dropout / residual_dropout are training choices (recipes), not the model.
    CONFIG = {**COMMON_CONFIG, "attention_bias": "add_qkv_bias"}
    MEGATRON_FIXED = LLAMA_LIKE
    HF_FIXED = dict(hidden_act="silu", attention_out_bias=False, mlp_bias=False)
    UNSUPPORTED = {
        "attention_out_bias": "a bias on o_proj: Megatron's add_bias_linear would bias the MLP too",
        "mlp_bias": "Megatron's add_bias_linear would bias attention too",
    }
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.qkv_bias(),
        *blocks.gated_mlp(),
    ]
    NOTES = "q/k/v biases; head_dim != hidden/heads"
