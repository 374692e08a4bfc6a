"""Llama 2 / 3 / 3.1 / 3.2 (tied embeddings and llama3 rope scaling included)."""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge


@register_bridge
class LlamaBridge(FamilyBridge):
    family = "llama"
    architectures = ("LlamaForCausalLM",)
    hf_model_type = "llama"
    NAME = "Llama"
    MEGATRON_FIXED = LLAMA_LIKE
    HF_FIXED = dict(hidden_act="silu", mlp_bias=False, attention_bias=False)
    UNSUPPORTED = {
        "mlp_bias": "Megatron's add_bias_linear would put biases on attention too",
        # HF's attention_bias also puts a bias on o_proj; add_qkv_bias does not cover it.
        "attention_bias": "a bias on o_proj as well as q/k/v",
    }
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.gated_mlp(),
    ]
    NOTES = "tied embeddings; rope scaling: default, linear, llama3"
