"""Gemma 3 (text)'s tiny test models (see conversion/tiny.py).

Four layers, the second global (a second pipeline stage must still know which of its
layers are global); local and global RoPE differ.
"""

from megabridge.conversion.tiny import DENSE

BASE = {
    **DENSE,
    "num_hidden_layers": 4,
    "head_dim": 24,
    "query_pre_attn_scalar": 20,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                    "sliding_attention"],
    # local theta 1e3, global theta 1e5 with linear scaling
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}  # fmt: skip

TINY = {
    "base": BASE,
    "untied_capped": {
        **BASE,
        "tie_word_embeddings": False,
        "final_logit_softcapping": 3.0,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    },
}

# Gemma norms what o_proj and down_proj (and, in Gemma 3, q/k_proj) produce, so scaling
# them changes no logit; gate_proj goes through GELU first.
PERTURB_TENSOR = "layers.0.mlp.gate_proj"
