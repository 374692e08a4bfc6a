"""Qwen3 (dense): Llama's layout plus per-head RMSNorm on queries and keys; head_dim is its own."""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE
from megabridge.conversion.registry import register_bridge
from megabridge.models.qwen2.bridge import Qwen2Bridge


@register_bridge
class Qwen3Bridge(Qwen2Bridge):
    """Qwen2 without the q/k/v biases, with QK norm (and Qwen2's sliding-window layers)."""

    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    hf_model_type = "qwen3"
    NAME = "Qwen3"
    MEGATRON_FIXED = {**LLAMA_LIKE, "qk_layernorm": True}
    HF_FIXED = dict(hidden_act="silu", use_sliding_window=False, attention_bias=False)
    # HF's attention_bias also puts a bias on o_proj; Megatron's add_qkv_bias does not.
    UNSUPPORTED = {"attention_bias": "a bias on o_proj as well as q/k/v"}
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.qk_norm(),
        *blocks.gated_mlp(),
    ]
    NOTES = "per-head QK norm; head_dim != hidden/heads; tied embeddings (0.6B-4B); sliding-window layers"
