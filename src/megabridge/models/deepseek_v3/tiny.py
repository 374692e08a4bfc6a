"""DeepSeek-V3's tiny test models (see conversion/tiny.py).

Layer 0 dense, layers 1-3 MoE (four layers, so two pipeline stages): 4 experts in 2
groups (1 chosen), top-2, a shared expert; MLA with a query low-rank projection.
"kimi_k2_yarn": Kimi-K2's one expert group and its YaRN (beta_fast = beta_slow = 1,
factor 32), with mscale_all_dim 0.8 instead of Kimi-K2's 1.0, so that both the
rotary factor (mscale / mscale_all_dim) and the softmax scale (mscale_all_dim's,
squared) count. "moonlight": no query low-rank projection, one group, rms_norm_eps
1e-5 (the latent norms keep transformers' 1e-6).
"""

from megabridge.conversion.tiny import MOE

BASE = {**MOE, "num_hidden_layers": 4, "num_key_value_heads": 4, "intermediate_size": 96,
        "moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 1,
        "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rms_norm_eps": 1e-6}  # fmt: skip

KIMI_K2_YARN = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0, "beta_fast": 1.0,
                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                "original_max_position_embeddings": 4}  # fmt: skip

TINY = {
    "base": BASE,
    "kimi_k2_yarn": {**BASE, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827,
                     "rope_parameters": KIMI_K2_YARN},
    "moonlight": {**BASE, "q_lora_rank": None, "n_group": 1, "topk_group": 1,
                  "n_shared_experts": 2, "routed_scaling_factor": 2.446, "rms_norm_eps": 1e-5,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}},
}  # fmt: skip
