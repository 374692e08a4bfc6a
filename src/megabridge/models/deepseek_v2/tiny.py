"""DeepSeek-V2's tiny test models (see conversion/tiny.py).

Layer 0 dense, layers 1-3 MoE (four layers, so two pipeline stages): 4 experts,
top-2, softmax scores, 2 shared experts. "base" is V2-Lite's shape (no query
low-rank projection, greedy routing); "group_limited" is V2's: a query low-rank
projection, 2 groups of 2 experts with the 1 best-scoring group kept (ranking by
the best score, not Megatron-Core's top-2 sum, decides) and V2's YaRN (mscale =
mscale_all_dim = 0.707).
"""

from megabridge.conversion.tiny import MOE

BASE = {**MOE, "num_hidden_layers": 4, "num_key_value_heads": 4, "intermediate_size": 96,
        "moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 2,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 16,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "norm_topk_prob": False, "rms_norm_eps": 1e-6}  # fmt: skip

V2_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
           "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
           "original_max_position_embeddings": 32}  # fmt: skip

TINY = {
    "base": BASE,
    "group_limited": {**BASE, "q_lora_rank": 32, "topk_method": "group_limited_greedy",
                      "n_group": 2, "topk_group": 1, "routed_scaling_factor": 16.0,
                      "rope_parameters": V2_YARN},
}  # fmt: skip
