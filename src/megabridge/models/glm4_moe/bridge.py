"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (Glm4MoeForCausalLM): Llama's layer with q/k/v biases,
optional per-head QK norm, partial RoPE (rotate-half, not GLM-4's interleaved pairs) and
DeepSeek-V3's MoE: sigmoid group-limited routing with a correction bias, shared experts,
dense first layers (conversion/moe.py reads and writes those fields).

The releases carry a multi-token-prediction layer after the last one (model.layers.46 in
4.5-Air, 92 in 4.5/4.6); transformers skips it, so do we: it is not exported.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.moe import grouped_sigmoid_routing_fields, read_grouped_sigmoid_routing
from megabridge.conversion.registry import register_bridge


@register_bridge
class Glm4MoeBridge(FamilyBridge):
    family = "glm4_moe"
    architectures = ("Glm4MoeForCausalLM",)
    hf_model_type = "glm4_moe"
    NAME = "GLM-4.5"
    CONFIG = {
        **COMMON_CONFIG,
        "attention_bias": "add_qkv_bias",  # q, k and v only: o_proj never has one
        "use_qk_norm": "qk_layernorm",
        "n_routed_experts": "num_moe_experts",
        "num_experts_per_tok": "moe_router_topk",
        "moe_intermediate_size": "moe_ffn_hidden_size",
        "routed_scaling_factor": "moe_router_topk_scaling_factor",
    }
    MEGATRON_FIXED = dict(
        **LLAMA_LIKE,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32",  # transformers routes in fp32 too
        # aux-loss-free balancing through the expert bias, as released; no extra loss.
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )
    HF_FIXED = dict(hidden_act="silu")
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.attention(),
        *blocks.qkv_bias(),
        *blocks.qk_norm(),
        *blocks.gated_mlp(),  # the first_k_dense_replace dense layers
        *blocks.router(expert_bias=True),
        *blocks.routed_experts(),
        *blocks.shared_experts(),
    ]
    # The multi-token-prediction layer of 4.5-Air (46) / 4.5, 4.6 (92), as transformers skips
    # it; a real layer of that index is consumed before this is consulted.
    IGNORED_HF = (r".*\.rotary_emb\.inv_freq$", r"model\.layers\.(46|92)\.")
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = (
        "sigmoid group-limited routing with expert bias; shared expert; dense first layers; "
        "q/k/v biases; QK norm (4.5, 4.6); partial RoPE; MTP layer not converted"
    )

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        cfg.rotary_percent = float(hf_config.rope_parameters.get("partial_rotary_factor", 1.0))
        read_grouped_sigmoid_routing(cls.display_name(), hf_config, cfg)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_percent
        data["attention_bias"] = cfg.add_qkv_bias
        data["use_qk_norm"] = cfg.qk_layernorm
        data.update(grouped_sigmoid_routing_fields(cls.display_name(), cfg))
        data["num_nextn_predict_layers"] = 0  # none is converted
