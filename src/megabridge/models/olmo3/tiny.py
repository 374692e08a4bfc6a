"""OLMo 3's tiny test models (see conversion/tiny.py).

Four layers, the second global (a second pipeline stage must still know which of its
layers are windowed); windows of 8 < the verify sequences; local and global RoPE differ.
"""

from megabridge.conversion.tiny import DENSE

BASE = {
    **DENSE,
    "num_hidden_layers": 4,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                    "sliding_attention"],
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
    "eos_token_id": None,  # the default (50279) is beyond the tiny vocabulary
}  # fmt: skip

TINY = {
    "base": BASE,
    # every layer global (no windows), tied embeddings
    "global_tied": {
        **BASE,
        "layer_types": ["full_attention"] * 4,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
        },
    },
}
