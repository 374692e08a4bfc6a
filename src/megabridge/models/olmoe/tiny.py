"""OLMoE's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import MOE

BASE = {**MOE, "intermediate_size": 32, "num_experts": 4, "norm_topk_prob": False}

TINY = {
    "base": BASE,
    "norm_topk": {**BASE, "norm_topk_prob": True},
}
