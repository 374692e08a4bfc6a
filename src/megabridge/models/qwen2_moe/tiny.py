"""Qwen2-MoE's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import MOE

# Layer 0 dense (decoder_sparse_step=2), layer 1 MoE with a gated shared expert.
BASE = {**MOE, "intermediate_size": 96, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "num_experts": 4, "decoder_sparse_step": 2,
        "norm_topk_prob": False}  # fmt: skip

TINY = {
    "base": BASE,  # norm_topk_prob=False: softmax over all experts, then top-k
    "renormalised": {**BASE, "norm_topk_prob": True, "decoder_sparse_step": 1},  # all MoE
}
