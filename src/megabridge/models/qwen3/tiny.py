"""Qwen3's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# heads * head_dim (128) != hidden_size (64), as in Qwen3-0.6B.
BASE = {**DENSE, "head_dim": 32}

TINY = {
    "base": BASE,
    "tied": {**BASE, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    # use_sliding_window: layer 1 slides (window 8), layer 0 stays full.
    "window": {**BASE, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
}  # fmt: skip
