"""Qwen2 / Qwen2.5's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

TINY = {
    "base": DENSE,
    # Qwen2.5 0.5B-3B tie the output layer to the embedding.
    "tied": {**DENSE, "tie_word_embeddings": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    # use_sliding_window: layers from max_window_layers (1) on slide, with a window (8)
    # shorter than the verify sequences; layer 0 stays full.
    "window": {**DENSE, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
}  # fmt: skip
