"""DeepSeek-V3 (and its R1 / V3.1 checkpoints in bf16): multi-latent attention + sigmoid-routed MoE.

Attention: Megatron-Core's MLASelfAttention holds the same matrices as transformers
(q_a/q_b, kv_a_proj_with_mqa/kv_b, per head [no-RoPE, RoPE] and [key, value]),
so every tensor is a rename. Both sides de-interleave the RoPE channels
(``rope_interleave``) before rotating them.

Routing: sigmoid scores; the correction bias (Megatron's ``expert_bias``) only
picks the experts; groups ranked by the sum of their top-2 scores
(Megatron: top topk/group_topk, so topk = 2 x topk_group); weights renormalised
and multiplied by ``routed_scaling_factor``. The first ``first_k_dense_replace``
layers have a dense MLP. The original FP8 release must be dequantised to bf16 first.
"""

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.conversion.moe import grouped_sigmoid_routing_fields, read_grouped_sigmoid_routing
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError


@register_bridge
class DeepseekV3Bridge(FamilyBridge):
    family = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    hf_model_type = "deepseek_v3"
    NAME = "DeepSeek-V3"
    # No num_key_value_heads / head_dim: MLA's heads are shaped by the ranks and head dims.
    CONFIG = {
        **{k: v for k, v in COMMON_CONFIG.items() if v not in ("num_query_groups", "kv_channels")},
        "q_lora_rank": "q_lora_rank",
        "kv_lora_rank": "kv_lora_rank",
        "qk_nope_head_dim": "qk_head_dim",
        "qk_rope_head_dim": "qk_pos_emb_head_dim",
        "v_head_dim": "v_head_dim",
        "n_routed_experts": "num_moe_experts",
        "num_experts_per_tok": "moe_router_topk",
        "moe_intermediate_size": "moe_ffn_hidden_size",
        "routed_scaling_factor": "moe_router_topk_scaling_factor",
    }
    MEGATRON_FIXED = dict(
        **LLAMA_LIKE,
        multi_latent_attention=True,
        qk_layernorm=True,  # q_a_layernorm and kv_a_layernorm
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_pre_softmax=False,
        moe_router_dtype="fp32",  # transformers routes in fp32 too
        # The paper's complementary sequence-wise balance loss (alpha = 1e-4) for training.
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-4,
    )
    HF_FIXED = dict(
        hidden_act="silu", rope_interleave=True, attention_bias=False, norm_topk_prob=True
    )
    UNSUPPORTED = {"attention_bias": "MLA's projections have no biases in Megatron-Core"}
    MAPPINGS = [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.mla_attention(),
        *blocks.gated_mlp(),  # the first_k_dense_replace dense layers
        *blocks.router(expert_bias=True),
        *blocks.routed_experts(),
        *blocks.shared_experts(),
    ]
    # The release's multi-token-prediction module (layer 61), which transformers skips too.
    IGNORED_HF = (r".*\.rotary_emb\.inv_freq$", r"model\.layers\.61\.")
    PARALLELISM = ("TP", "PP", "EP")
    NOTES = "MLA; sigmoid group-limited routing with expert bias; shared expert; dense first layers"

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if getattr(hf_config, "quantization_config", None):
            raise UserError("DeepSeek-V3 in FP8 (quantization_config) is not supported: use bf16")
        if not getattr(hf_config, "rope_interleave", True):
            # Megatron-Core's MLA always de-interleaves the RoPE channels first.
            raise UserError("DeepSeek-V3 with rope_interleave=False is not supported yet")
        if hf_config.rms_norm_eps != 1e-6:
            # transformers' q_a / kv_a norms always use 1e-6; Megatron-Core has one epsilon.
            raise UserError(
                f"DeepSeek-V3 with rms_norm_eps={hf_config.rms_norm_eps} is not supported yet "
                "(its latent norms use 1e-6 whatever the config says)"
            )
        read_grouped_sigmoid_routing(cls.display_name(), hf_config, cfg)

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        data.update(grouped_sigmoid_routing_fields(cls.display_name(), cfg))
        data["num_key_value_heads"] = cfg.num_attention_heads
