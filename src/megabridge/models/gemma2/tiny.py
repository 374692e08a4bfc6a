"""Gemma 2's tiny test models (see conversion/tiny.py).

Two layers, sliding window then global; the window (8) is shorter than the verify
sequences (32) and the soft-caps are small enough to bite.
"""

from megabridge.conversion.tiny import DENSE

BASE = {
    **DENSE,
    "head_dim": 24,  # not hidden / heads
    "query_pre_attn_scalar": 20,  # not head_dim
    "sliding_window": 8,
    "attn_logit_softcapping": 2.0,
    "final_logit_softcapping": 3.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

TINY = {
    "base": BASE,
    "untied_uncapped": {**BASE, "tie_word_embeddings": False, "attn_logit_softcapping": None,
                        "final_logit_softcapping": None},
}  # fmt: skip

# Gemma norms what o_proj and down_proj produce, so scaling v/o/up/down_proj changes no
# logit; gate_proj goes through GELU first.
PERTURB_TENSOR = "layers.0.mlp.gate_proj"
