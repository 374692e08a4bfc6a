"""EXAONE 4: OLMo 2's norms on the sublayer outputs, per-head QK norm, and (32B) sliding-window
layers between global ones that use no RoPE at all (NoPE)."""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

LAYER_TYPES = ("full_attention", "sliding_attention")


@register_bridge
class Exaone4Bridge(FamilyBridge):
    family = "exaone4"
    architectures = ("Exaone4ForCausalLM",)
    hf_model_type = "exaone4"
    NAME = "EXAONE 4"
    MEGATRON_FIXED = {**LLAMA_LIKE, "norm_placement": "post", "qk_layernorm": True}
    HF_FIXED = dict(hidden_act="silu")
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.post_norms(),
        *blocks.attention(),
        *blocks.qk_norm(),
        *blocks.gated_mlp(),
    ]
    NOTES = (
        "post-sublayer norms (torch spec); per-head QK norm; windowed layers; NoPE global layers"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        unknown = sorted(set(hf_config.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UserError(f"{cls.NAME} layer_types {unknown} are not supported yet")
        if hf_config.sliding_window is None:
            return  # every layer global, with RoPE
        # transformers: with a window configured, only the sliding layers rotate q and k.
        kinds = hf_config.layer_types
        cfg.sliding_window = hf_config.sliding_window
        cfg.sliding_window_layers = [i for i, k in enumerate(kinds) if k == LAYER_TYPES[1]]
        cfg.no_rope_layers = [i for i, k in enumerate(kinds) if k == LAYER_TYPES[0]]

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        windowed = [cfg.window_of_layer(i) is not None for i in range(cfg.num_layers)]
        data["layer_types"] = [LAYER_TYPES[w] for w in windowed]
        data["sliding_window"] = cfg.sliding_window
        expected = [i for i, w in enumerate(windowed) if not w] if cfg.sliding_window else []
        if sorted(cfg.no_rope_layers or []) != expected:
            raise UserError(
                f"{cls.NAME} has NoPE exactly on the global layers when a sliding window is set "
                f"(layers {expected}); no_rope_layers={cfg.no_rope_layers} cannot be exported"
            )
        if cfg.sliding_window is None:
            data["sliding_window_pattern"] = 0
