"""EXAONE 4's tiny test models (see conversion/tiny.py).

Four layers: three sliding-window (8 < the verify sequences) with RoPE, then a global
one without (EXAONE 4.0 32B's "LLLG"); PP=2 puts a NoPE layer on the second stage.
"""

from megabridge.conversion.tiny import DENSE

_KINDS = ["sliding_attention"] * 3 + ["full_attention"]
BASE = {**DENSE, "num_hidden_layers": 4, "head_dim": 32, "sliding_window": 8,
        "layer_types": _KINDS,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 16.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16}}  # fmt: skip

TINY = {
    "base": BASE,
    # EXAONE 4.0 1.2B's kind: no window, every layer global with RoPE; tied embeddings
    "global_tied": {**BASE, "sliding_window": None, "layer_types": ["full_attention"] * 4,
                    "tie_word_embeddings": True},
}  # fmt: skip
