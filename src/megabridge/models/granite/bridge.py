"""Granite 3 (dense): Llama's layout with four muP multipliers: embeddings times
embedding_multiplier, attention scores times attention_multiplier (the softmax scale),
sublayer outputs times residual_multiplier before each residual add, logits divided by
logits_scaling."""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge

# HF multiplier -> ModelConfig field (models/hooks.py and torch_layers.py apply them).
GRANITE_MULTIPLIERS = {
    "embedding_multiplier": "embedding_multiplier",
    "attention_multiplier": "softmax_scale",
    "residual_multiplier": "residual_multiplier",
    "logits_scaling": "logits_divisor",
}


@register_bridge
class GraniteBridge(FamilyBridge):
    family = "granite"
    architectures = ("GraniteForCausalLM",)
    hf_model_type = "granite"
    CONFIG = {**COMMON_CONFIG, **GRANITE_MULTIPLIERS}
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
    NOTES = (
        "embedding, attention, residual and logits multipliers (residual: torch spec); "
        "tied embeddings"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        # 1.0 is transformers' "no scaling": leave those fields off (None), so that an
        # unscaled model needs no torch-only residual scaling.
        for field in ("embedding_multiplier", "residual_multiplier", "logits_divisor"):
            if getattr(cfg, field) == 1.0:
                setattr(cfg, field, None)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        # transformers' defaults are 1.0 (no scaling), except attention_multiplier, which it
        # uses as the softmax scale itself: a model from scratch gets 1/sqrt(head_dim) written.
        head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        data.setdefault("attention_multiplier", head_dim**-0.5)
        for hf_field in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            data.setdefault(hf_field, 1.0)
