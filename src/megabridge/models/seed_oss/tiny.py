"""Seed-OSS's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# heads * head_dim (128) != hidden_size (64), as in Seed-OSS-36B (80 * 128 != 5120).
BASE = {**DENSE, "head_dim": 32, "attention_bias": True, "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}}  # fmt: skip

TINY = {
    "base": BASE,
    "no_bias_tied": {**BASE, "attention_bias": False, "tie_word_embeddings": True},
}  # fmt: skip
