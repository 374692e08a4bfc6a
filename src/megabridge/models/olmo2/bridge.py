"""OLMo 2: norms on the attention and MLP outputs (before the residual add), no pre-norms,
and q/k norms over the whole projection (all heads at once), not per head."""

from megabridge.conversion import blocks
from megabridge.conversion.family import LLAMA_LIKE, FamilyBridge
from megabridge.conversion.registry import register_bridge


@register_bridge
class Olmo2Bridge(FamilyBridge):
    family = "olmo2"
    architectures = ("Olmo2ForCausalLM",)
    hf_model_type = "olmo2"
    NAME = "OLMo 2"
    MEGATRON_FIXED = {**LLAMA_LIKE, "norm_placement": "post", "qk_norm_across_heads": True}
    HF_FIXED = dict(hidden_act="silu", attention_bias=False)
    UNSUPPORTED = {"attention_bias": "a bias on o_proj as well as q/k/v"}
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.post_norms(),
        *blocks.attention(),
        *blocks.qk_norm(),
        *blocks.gated_mlp(),
    ]
    NOTES = "post-sublayer norms; QK norm over all heads (TP-split); torch layer spec only"
