"""Qwen3 (dense): Llama's layout plus per-head RMSNorm on queries and keys; head_dim is its own."""

from megabridge.conversion.mappings import renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.llama.bridge import HF_LAYER, LAYER, LlamaBridge
from megabridge.models.qwen2.bridge import Qwen2Bridge


@register_bridge
class Qwen3Bridge(Qwen2Bridge):
    family = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    hf_model_type = "qwen3"
    MEGATRON_FIXED = {**LlamaBridge.MEGATRON_FIXED, "qk_layernorm": True}
    HF_FIXED = dict(hidden_act="silu", use_sliding_window=False, attention_bias=False)
    MAPPINGS = [
        *LlamaBridge.MAPPINGS,
        *renames(
            {
                f"{LAYER}.self_attention.q_layernorm.weight": f"{HF_LAYER}.self_attn.q_norm.weight",
                f"{LAYER}.self_attention.k_layernorm.weight": f"{HF_LAYER}.self_attn.k_norm.weight",
            }
        ),
    ]
    NOTES = "per-head QK norm; head_dim != hidden/heads; tied embeddings (0.6B-4B)"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        super().adjust_model_config(hf_config, cfg)
        # HF's attention_bias also puts a bias on o_proj; Megatron's add_qkv_bias does not.
        if getattr(hf_config, "attention_bias", False):
            raise UserError("Qwen3 with attention_bias=True is not supported yet")
