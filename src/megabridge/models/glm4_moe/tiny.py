"""GLM-4.5's tiny test models (see conversion/tiny.py).

Layer 0 dense, layers 1-3 MoE (four layers, so two pipeline stages): 4 experts, top-2, a
shared expert, q/k/v biases, RoPE on half of each head; head_dim * heads != hidden.
"""

from megabridge.conversion.tiny import MOE

BASE = {**MOE, "num_hidden_layers": 4, "head_dim": 32, "intermediate_size": 96,
        "moe_intermediate_size": 32, "n_routed_experts": 4, "n_shared_experts": 1,
        "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "attention_bias": True,
        "num_nextn_predict_layers": 0}  # fmt: skip

TINY = {
    # GLM-4.5-Air: no QK norm, one expert group.
    "base": BASE,
    # GLM-4.5 / 4.6: per-head QK norm; here also 2 groups of 2 experts, 1 chosen.
    "qk_norm_groups": {**BASE, "use_qk_norm": True, "n_group": 2, "topk_group": 1},
}  # fmt: skip
