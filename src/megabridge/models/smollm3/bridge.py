"""SmolLM3: Llama's layout with NoPE layers (every 4th skips RoPE: HF no_rope_layers, 1 for a
layer with RoPE; Megatron-Core's no_rope_freq, 1 for one without) and, optionally, sliding
windows on the layers that HF's layer_types name."""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

LAYER_TYPES = ("full_attention", "sliding_attention")


@register_bridge
class SmolLM3Bridge(FamilyBridge):
    family = "smollm3"
    architectures = ("SmolLM3ForCausalLM",)
    hf_model_type = "smollm3"
    NAME = "SmolLM3"
    MEGATRON_FIXED = LLAMA_LIKE
    HF_FIXED = dict(hidden_act="silu", attention_bias=False, mlp_bias=False)
    UNSUPPORTED = {
        "attention_bias": "a bias on o_proj as well as q/k/v",
        "mlp_bias": "Megatron's add_bias_linear would bias attention too",
    }
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.gated_mlp(),
    ]
    NOTES = "NoPE layers (no_rope_layers, Megatron's no_rope_freq); sliding-window layers; tied"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        cfg.no_rope_layers = [i for i, rope in enumerate(hf_config.no_rope_layers) if not rope]
        unknown = sorted(set(hf_config.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UserError(f"{cls.NAME} layer_types {unknown} are not supported yet")
        windowed = [i for i, kind in enumerate(hf_config.layer_types) if kind == LAYER_TYPES[1]]
        # transformers windows only with use_sliding_window and a window set.
        if hf_config.use_sliding_window and hf_config.sliding_window and windowed:
            cfg.sliding_window = hf_config.sliding_window
            cfg.sliding_window_layers = windowed

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        nope = set(cfg.no_rope_layers or [])
        data["no_rope_layers"] = [int(i not in nope) for i in range(cfg.num_layers)]
        windowed = [cfg.window_of_layer(i) is not None for i in range(cfg.num_layers)]
        data["use_sliding_window"] = any(windowed)
        data["sliding_window"] = cfg.sliding_window if any(windowed) else None
        data["layer_types"] = [LAYER_TYPES[w] for w in windowed]
        # SmolLM3Config's default pad_token_id is 128004, a row that a model of a smaller
        # vocabulary does not have (transformers then refuses to build it): none was trained.
        data.setdefault("pad_token_id", None)
