"""Qwen2 / Qwen2.5's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

TINY = {
    "base": DENSE,
    # Qwen2.5 0.5B-3B tie the output layer to the embedding.
    "tied": {**DENSE, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
}  # fmt: skip
