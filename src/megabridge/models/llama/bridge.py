"""Llama 2 / 3 / 3.1 / 3.2 (tied embeddings and llama3 rope scaling included)."""

from megabridge.conversion.family import COMMON_CONFIG, FamilyBridge
from megabridge.conversion.mappings import QKV, GatedMLP, renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError

LAYER = "decoder.layers.*"
HF_LAYER = "model.layers.*"


@register_bridge
class LlamaBridge(FamilyBridge):
    family = "llama"
    architectures = ("LlamaForCausalLM",)
    hf_model_type = "llama"
    CONFIG = COMMON_CONFIG
    MEGATRON_FIXED = dict(
        normalization="RMSNorm",
        activation="swiglu",
        position_embedding_type="rope",
        add_bias_linear=False,
    )
    HF_FIXED = dict(hidden_act="silu", mlp_bias=False, attention_bias=False)
    MAPPINGS = [
        *renames(
            {
                "embedding.word_embeddings.weight": "model.embed_tokens.weight",
                "decoder.final_layernorm.weight": "model.norm.weight",
                "output_layer.weight": "lm_head.weight",
                f"{LAYER}.input_layernorm.weight": f"{HF_LAYER}.input_layernorm.weight",
                f"{LAYER}.pre_mlp_layernorm.weight": f"{HF_LAYER}.post_attention_layernorm.weight",
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
    NOTES = "tied embeddings; rope scaling: default, linear, llama3"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        for flag in ("mlp_bias", "attention_bias"):
            # HF's attention_bias also puts a bias on o_proj, which Megatron's
            # add_qkv_bias does not cover.
            if getattr(hf_config, flag, False):
                raise UserError(f"Llama with {flag}=True is not supported yet")
