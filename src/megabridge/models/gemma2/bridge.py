"""Gemma 2: (1 + w) RMSNorms, four per layer; GeGLU; embeddings scaled by sqrt(hidden);
soft-capped attention scores and logits; sliding-window layers between global ones."""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

LAYER_TYPES = ("sliding_attention", "full_attention")


@register_bridge
class Gemma2Bridge(FamilyBridge):
    family = "gemma2"
    architectures = ("Gemma2ForCausalLM",)
    hf_model_type = "gemma2"
    CONFIG = {
        **COMMON_CONFIG,
        "sliding_window": "sliding_window",
        "attn_logit_softcapping": "attn_logit_softcap",
        "final_logit_softcapping": "final_logit_softcap",
    }
    MEGATRON_FIXED = {
        **LLAMA_LIKE,
        "layernorm_zero_centered_gamma": True,
        "norm_placement": "pre_post",
        "activation": "geglu",
    }
    HF_FIXED = dict(hidden_activation="gelu_pytorch_tanh", attention_bias=False)
    UNSUPPORTED = {
        "attention_bias": "a bias on o_proj as well as q/k/v",
        "use_bidirectional_attention": "Megatron-Core's GPT attention is causal only",
    }
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_post_norms(),
        *blocks.attention(),
        *blocks.gated_mlp(),
    ]
    NOTES = "tied embeddings; sliding window, attention and final logit soft-capping (torch spec)"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        name = cls.display_name()
        act = getattr(hf_config, "hidden_activation", None) or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise UserError(
                f"{name} with hidden_activation={act!r} is not supported yet "
                "(only gelu_pytorch_tanh, which is GeGLU with the tanh approximation)"
            )
        unknown = sorted(set(hf_config.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UserError(f"{name} layer_types {unknown} are not supported yet")
        # transformers: embeddings * sqrt(hidden_size); scores * query_pre_attn_scalar**-0.5
        cfg.embedding_multiplier = hf_config.hidden_size**0.5
        cfg.softmax_scale = hf_config.query_pre_attn_scalar**-0.5
        cfg.sliding_window_layers = [
            i for i, kind in enumerate(hf_config.layer_types) if kind == "sliding_attention"
        ]

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        if cfg.embedding_multiplier != cfg.hidden_size**0.5:
            raise UserError(
                f"{cls.architectures[0]} scales embeddings by sqrt(hidden_size); "
                f"embedding_multiplier={cfg.embedding_multiplier} cannot be exported"
            )
        head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        data["head_dim"] = head_dim
        scalar = head_dim if cfg.softmax_scale is None else cfg.softmax_scale**-2
        data["query_pre_attn_scalar"] = (
            round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
        )
        # Written even when None: transformers' defaults (4096, 50.0, 30.0) are not "off".
        data["sliding_window"] = cfg.sliding_window
        data["attn_logit_softcapping"] = cfg.attn_logit_softcap
        data["final_logit_softcapping"] = cfg.final_logit_softcap
        data["layer_types"] = [
            LAYER_TYPES[cfg.window_of_layer(i) is None] for i in range(cfg.num_layers)
        ]
