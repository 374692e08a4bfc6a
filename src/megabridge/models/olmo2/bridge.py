"""OLMo 2: norms on the attention and MLP outputs (before the residual add), no pre-norms,
and q/k norms over the whole projection (all heads at once), not per head."""

from megabridge.conversion.family import FamilyBridge
from megabridge.conversion.mappings import QKV, GatedMLP, renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.llama.bridge import HF_LAYER, LAYER, LlamaBridge


@register_bridge
class Olmo2Bridge(FamilyBridge):
    family = "olmo2"
    architectures = ("Olmo2ForCausalLM",)
    hf_model_type = "olmo2"
    MEGATRON_FIXED = {
        **LlamaBridge.MEGATRON_FIXED,
        "norm_placement": "post",
        "qk_norm_across_heads": True,
    }
    HF_FIXED = dict(hidden_act="silu", attention_bias=False)
    MAPPINGS = [
        *renames(
            {
                "embedding.word_embeddings.weight": "model.embed_tokens.weight",
                "decoder.final_layernorm.weight": "model.norm.weight",
                "output_layer.weight": "lm_head.weight",
                # HF's post_attention_layernorm is on the attention output here (in
                # Llama it is the MLP's pre-norm).
                f"{LAYER}.post_self_attn_layernorm.weight": f"{HF_LAYER}.post_attention_layernorm.weight",
                f"{LAYER}.post_mlp_layernorm.weight": f"{HF_LAYER}.post_feedforward_layernorm.weight",
                f"{LAYER}.self_attention.q_layernorm.weight": f"{HF_LAYER}.self_attn.q_norm.weight",
                f"{LAYER}.self_attention.k_layernorm.weight": f"{HF_LAYER}.self_attn.k_norm.weight",
                f"{LAYER}.self_attention.linear_proj.weight": f"{HF_LAYER}.self_attn.o_proj.weight",
                f"{LAYER}.mlp.linear_fc2.weight": f"{HF_LAYER}.mlp.down_proj.weight",
            }
        ),
        QKV(
            f"{LAYER}.self_attention.linear_qkv.weight",
            tuple(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in "qkv"),
        ),
        GatedMLP(
            f"{LAYER}.mlp.linear_fc1.weight",
            (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight"),
        ),
    ]
    NOTES = "post-sublayer norms; QK norm over all heads (TP-split); torch layer spec only"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if getattr(hf_config, "attention_bias", False):
            raise UserError("OLMo 2 with attention_bias=True is not supported yet")
