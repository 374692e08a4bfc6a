"""What DeepSeek-V2 and DeepSeek-V3 (and the releases built on them) share.

Multi-latent attention, dense MLPs in the first ``first_k_dense_replace`` layers and
MoE layers after them, ``n_shared_experts`` shared experts every token goes through,
``routed_scaling_factor`` on the routed experts' weights. MlaMoeBridge reads and
writes those; each family derives from it and adds its routing.

Attention: Megatron-Core's MLASelfAttention holds the same matrices as transformers
(q_a/q_b or q_proj, kv_a_proj_with_mqa/kv_b, per head [no-RoPE, RoPE] and [key,
value]), so every tensor is a rename. transformers rotates the RoPE channels of V2
as interleaved complex pairs and of V3 de-interleaved first (``rope_interleave``);
Megatron-Core de-interleaves: the rotated pairs are the same, and attention scores
do not depend on the order of the channels, so both match.
"""

from __future__ import annotations

from megabridge.conversion import blocks
from megabridge.conversion.family import COMMON_CONFIG, LLAMA_LIKE, FamilyBridge
from megabridge.errors import UserError

# transformers' latent norms (q_a_layernorm, kv_a_layernorm) always use this epsilon.
LATENT_NORM_EPS = 1e-6

# No num_key_value_heads / head_dim: MLA's heads are shaped by the ranks and head dims.
MLA_MOE_CONFIG = {
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

MLA_MOE_FIXED = dict(
    **LLAMA_LIKE,
    multi_latent_attention=True,
    qk_layernorm=True,  # q_a_layernorm and kv_a_layernorm
    moe_router_dtype="fp32",  # transformers routes in fp32 too
)


def mla_moe_mappings(expert_bias: bool) -> list:
    """Every tensor of a DeepSeek-V2/V3 checkpoint; ``expert_bias``: V3's correction bias."""
    return [
        *blocks.embeddings_and_head(),
        *blocks.final_norm(),
        *blocks.pre_norms(),
        *blocks.mla_attention(),
        *blocks.gated_mlp(),  # the first_k_dense_replace dense layers
        *blocks.router(expert_bias=expert_bias),
        *blocks.routed_experts(),
        *blocks.shared_experts(),
    ]


class MlaMoeBridge(FamilyBridge):
    """MLA, dense first layers, shared experts: the DeepSeek-V2/V3 layout (routing apart)."""

    CONFIG = MLA_MOE_CONFIG
    UNSUPPORTED = {"attention_bias": "MLA's projections have no biases in Megatron-Core"}
    PARALLELISM = ("TP", "PP", "EP")

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        if hf_config.rms_norm_eps != LATENT_NORM_EPS:
            cfg.latent_norm_epsilon = LATENT_NORM_EPS  # the torch spec builds it
        dense = hf_config.first_k_dense_replace or 0
        cfg.moe_layer_freq = [0] * dense + [1] * (cfg.num_layers - dense) if dense else None
        shared = hf_config.n_shared_experts or 0
        cfg.moe_shared_expert_intermediate_size = shared * cfg.moe_ffn_hidden_size or None

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        pattern = cfg.moe_layer_freq or [1] * cfg.num_layers
        dense = pattern.index(1) if 1 in pattern else cfg.num_layers
        if pattern != [0] * dense + [1] * (cfg.num_layers - dense):
            raise UserError(f"{cls.display_name()} has dense layers first, then MoE layers only")
        latent_eps = cfg.latent_norm_epsilon or cfg.layernorm_epsilon
        if latent_eps != LATENT_NORM_EPS:
            raise UserError(
                f"{cls.display_name()}'s latent norms have epsilon {latent_eps}; transformers "
                f"always uses {LATENT_NORM_EPS} there"
            )
        shared = cfg.moe_shared_expert_intermediate_size or 0
        data.update(
            q_lora_rank=cfg.q_lora_rank,  # None (V2-Lite, Moonlight): written, not defaulted
            first_k_dense_replace=dense,
            n_shared_experts=shared // cfg.moe_ffn_hidden_size,
            num_key_value_heads=cfg.num_attention_heads,
        )
