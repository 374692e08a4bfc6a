"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen2-MoE's routing, QK-norm, no shared expert, no biases."""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE
from megabridge.conversion.moe import SparseStepMoeBridge
from megabridge.conversion.registry import register_bridge


@register_bridge
class Qwen3MoeBridge(SparseStepMoeBridge):
    family = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    hf_model_type = "qwen3_moe"
    NAME = "Qwen3-MoE"
    MEGATRON_FIXED = {**LLAMA_LIKE, "qk_layernorm": True, "moe_router_score_function": "softmax"}
    HF_FIXED = dict(hidden_act="silu", attention_bias=False, use_sliding_window=False)
    UNSUPPORTED = {
        "use_sliding_window": "windows on the layers from max_window_layers on only",
        # transformers then also puts a bias on o_proj, which add_qkv_bias does not cover.
        "attention_bias": "a bias on o_proj as well as q/k/v",
    }
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.qk_norm(),
        *blocks.gated_mlp(),  # the dense layers (mlp_only_layers)
        *blocks.router(),
        *blocks.routed_experts(),
    ]
    NOTES = "QK-norm; norm_topk_prob; mlp_only_layers / decoder_sparse_step"
