"""DeepSeek-V3's tiny test models (see conversion/tiny.py).

Layer 0 dense, layers 1-3 MoE (four layers, so two pipeline stages): 4 experts in 2
groups (1 chosen), top-2, a shared expert; MLA with a query low-rank projection.
rms_norm_eps is 1e-6 because transformers' latent norms always use 1e-6.
"""

from megabridge.conversion.tiny import MOE

BASE = {**MOE, "num_hidden_layers": 4, "num_key_value_heads": 4, "intermediate_size": 96,
        "moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 1,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rms_norm_eps": 1e-6}  # fmt: skip

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 32}  # fmt: skip

TINY = {
    "base": BASE,
    "yarn": {**BASE, "rope_parameters": YARN},
}
