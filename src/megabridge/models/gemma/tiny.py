"""Gemma (1)'s tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# head_dim (24) is not hidden / heads, as in gemma-7b (256 * 16 != 3072).
BASE = {**DENSE, "head_dim": 24, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}

TINY = {
    "base": BASE,
    # untied, to check the head too (gemma-2b's multi-query attention cannot run at TP=2:
    # one key/value head is not split over two ranks)
    "untied": {**BASE, "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
}  # fmt: skip
