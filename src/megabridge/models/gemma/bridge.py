"""Gemma (1): Llama's layout with (1 + w) RMSNorms, GeGLU (tanh GELU) and embeddings scaled by
sqrt(hidden_size); tied embeddings."""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

# The first releases wrote hidden_act="gelu"; transformers reads it as gelu_pytorch_tanh
# (configuration_gemma.py says it was always meant to be the tanh approximation).
GELU_TANH = ("gelu_pytorch_tanh", "gelu")


@register_bridge
class GemmaBridge(FamilyBridge):
    family = "gemma"
    architectures = ("GemmaForCausalLM",)
    hf_model_type = "gemma"
    MEGATRON_FIXED = {**LLAMA_LIKE, "layernorm_zero_centered_gamma": True, "activation": "geglu"}
    HF_FIXED = dict(hidden_act="gelu_pytorch_tanh", attention_bias=False)
    UNSUPPORTED = {
        "attention_bias": "a bias on o_proj as well as q/k/v",
        "use_bidirectional_attention": "Megatron-Core's GPT attention is causal only",
    }
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.gated_mlp(),
    ]
    NOTES = "(1 + w) RMSNorm; GeGLU; scaled embeddings; tied; 2B (one KV head) at TP=1 only"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        act = getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act
        if act not in GELU_TANH:
            raise UserError(
                f"{cls.display_name()} with hidden_act={act!r} is not supported yet "
                "(only gelu_pytorch_tanh, which is GeGLU with the tanh approximation)"
            )
        # transformers: embeddings * sqrt(hidden_size), rounded to the embeddings' dtype.
        cfg.embedding_multiplier = hf_config.hidden_size**0.5

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        if cfg.embedding_multiplier != cfg.hidden_size**0.5:
            raise UserError(
                f"{cls.display_name()} scales embeddings by sqrt(hidden_size); "
                f"embedding_multiplier={cfg.embedding_multiplier} cannot be exported"
            )
        data["head_dim"] = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
