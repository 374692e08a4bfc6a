"""Phi-3 / Phi-3.5 mini: Llama's blocks with fused projections.

HF's qkv_proj holds all query rows, then all key rows, then all value rows
(FusedQKV regroups them per query group). Its gate_up_proj is [gate; up], the
very layout of Megatron's linear_fc1, so that one is a plain rename.
"""

from megabridge.conversion.family import COMMON_CONFIG, FamilyBridge
from megabridge.conversion.mappings import FusedQKV, renames
from megabridge.conversion.registry import register_bridge
from megabridge.models.llama.bridge import HF_LAYER, LAYER, LlamaBridge


@register_bridge
class Phi3Bridge(FamilyBridge):
    family = "phi3"
    architectures = ("Phi3ForCausalLM",)
    hf_model_type = "phi3"
    CONFIG = {**COMMON_CONFIG, "sliding_window": "sliding_window"}
    MEGATRON_FIXED = LlamaBridge.MEGATRON_FIXED
    HF_FIXED = dict(hidden_act="silu")
    MAPPINGS = [
        *renames(
            {
                "embedding.word_embeddings.weight": "model.embed_tokens.weight",
                "decoder.final_layernorm.weight": "model.norm.weight",
                "output_layer.weight": "lm_head.weight",
                f"{LAYER}.input_layernorm.weight": f"{HF_LAYER}.input_layernorm.weight",
                f"{LAYER}.pre_mlp_layernorm.weight": f"{HF_LAYER}.post_attention_layernorm.weight",
                f"{LAYER}.self_attention.linear_proj.weight": f"{HF_LAYER}.self_attn.o_proj.weight",
                f"{LAYER}.mlp.linear_fc1.weight": f"{HF_LAYER}.mlp.gate_up_proj.weight",
                f"{LAYER}.mlp.linear_fc2.weight": f"{HF_LAYER}.mlp.down_proj.weight",
            }
        ),
        FusedQKV(
            f"{LAYER}.self_attention.linear_qkv.weight", f"{HF_LAYER}.self_attn.qkv_proj.weight"
        ),
    ]
    NOTES = "fused qkv/gate_up; sliding window (4k); partial rotary; longrope (128k, 3.5) not yet"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        rope = getattr(hf_config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
        cfg.rotary_percent = float(factor)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_percent
        data.setdefault("sliding_window", None)
