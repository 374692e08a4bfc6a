"""Phi-3 / Phi-3.5 mini / Phi-4-mini: Llama's blocks with fused projections.

HF's qkv_proj holds all query rows, then all key rows, then all value rows
(FusedQKV regroups them per query group). Its gate_up_proj is [gate; up], the
very layout of Megatron's linear_fc1, so that one is a plain rename.

longrope (the 128k models, Phi-3.5, Phi-4-mini): short factors up to
original_max_position_embeddings, long ones beyond, chosen per forward as transformers
does (models/rope.py); its attention_factor is resolved when read and written out.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.rope import longrope_attention_scaling, rope_type


@register_bridge
class Phi3Bridge(FamilyBridge):
    family = "phi3"
    architectures = ("Phi3ForCausalLM",)
    hf_model_type = "phi3"
    CONFIG = {**COMMON_CONFIG, "sliding_window": "sliding_window"}
    MEGATRON_FIXED = LLAMA_LIKE
    HF_FIXED = dict(hidden_act="silu")
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.fused_qkv_attention(),
        *blocks.fused_gated_mlp(),
    ]
    NOTES = "fused qkv/gate_up; sliding window (4k); partial rotary; longrope (128k, 3.5, Phi-4-mini; torch spec)"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        rope = getattr(hf_config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
        cfg.rotary_percent = float(factor)
        if rope_type(cfg.rope_scaling) == "longrope":
            # transformers derives it from max_position_embeddings, which a recipe's
            # seq_length would change: keep the checkpoint's value.
            cfg.rope_scaling.pop("attention_factor", None)
            cfg.rotary_attention_scaling = longrope_attention_scaling(
                rope, hf_config.max_position_embeddings
            )

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_percent
        if cfg.rotary_attention_scaling is not None:
            if rope_type(cfg.rope_scaling) != "longrope":
                raise UserError("Phi3 scales attention after RoPE only with longrope")
            data["rope_parameters"]["attention_factor"] = cfg.rotary_attention_scaling
        if "original_max_position_embeddings" in cfg.rope_scaling:
            # Phi3Config copies its top-level field (default 4096) into rope_parameters.
            original = cfg.rope_scaling["original_max_position_embeddings"]
            data["original_max_position_embeddings"] = original
        data.setdefault("sliding_window", None)
        # Phi3Config's default pad_token_id is 32000, a padding row that a model of another
        # vocabulary does not have (transformers then refuses the config): none was trained.
        data.setdefault("pad_token_id", None)
