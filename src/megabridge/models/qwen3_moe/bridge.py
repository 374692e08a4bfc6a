"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen2-MoE's routing, QK-norm, no shared expert, no biases."""

from megabridge.conversion.family import COMMON_CONFIG, FamilyBridge
from megabridge.conversion.mappings import renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.qwen2_moe.bridge import (
    ATTENTION,
    HF_LAYER,
    LAYER,
    MLP_AND_EXPERTS,
    MOE_CONFIG,
    check_no_sliding_window,
    hf_layer_fields,
    moe_layer_freq,
)


@register_bridge
class Qwen3MoeBridge(FamilyBridge):
    family = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    hf_model_type = "qwen3_moe"
    CONFIG = {**COMMON_CONFIG, **MOE_CONFIG}
    MEGATRON_FIXED = dict(
        normalization="RMSNorm",
        activation="swiglu",
        position_embedding_type="rope",
        add_bias_linear=False,
        qk_layernorm=True,
        moe_router_score_function="softmax",
    )
    HF_FIXED = dict(hidden_act="silu", attention_bias=False, use_sliding_window=False)
    MAPPINGS = [
        *ATTENTION,
        *renames(
            {
                f"{LAYER}.self_attention.q_layernorm.weight": f"{HF_LAYER}.self_attn.q_norm.weight",
                f"{LAYER}.self_attention.k_layernorm.weight": f"{HF_LAYER}.self_attn.k_norm.weight",
            }
        ),
        *MLP_AND_EXPERTS,
    ]
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = "QK-norm; norm_topk_prob; mlp_only_layers / decoder_sparse_step"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        check_no_sliding_window(hf_config, "Qwen3-MoE")
        if getattr(hf_config, "attention_bias", False):
            # transformers then also puts a bias on o_proj, which add_qkv_bias does not cover.
            raise UserError("Qwen3-MoE with attention_bias=True is not supported yet")
        cfg.moe_router_pre_softmax = not hf_config.norm_topk_prob
        cfg.moe_layer_freq = moe_layer_freq(hf_config)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["norm_topk_prob"] = not cfg.moe_router_pre_softmax
        data.update(hf_layer_fields(cfg))
