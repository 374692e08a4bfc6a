"""Llama 4's tiny test models (see conversion/tiny.py).

Four layers: RoPE with chunked attention (chunks of 8 < the verify sequences) on layers
0-2, NoPE on layer 3 (transformers' every 4th), so that at PP=2 the second stage holds
both kinds. A temperature floor of 4 tokens makes the NoPE layer's query scale change
within the verify sequences.
"""

from megabridge.conversion.tiny import MOE

BASE = {
    **MOE,
    "num_hidden_layers": 4,
    "head_dim": 16,
    "intermediate_size": 32,  # the experts' and the shared expert's
    "intermediate_size_mlp": 96,  # the dense layers'
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,  # Maverick's: MoE on layers 1 and 3
    "attention_chunk_size": 8,
    "use_qk_norm": True,
    "attn_temperature_tuning": True,
    "floor_scale": 4,
    "attn_scale": 0.5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

TINY = {
    "base": BASE,
    # Scout: every layer MoE, llama3 RoPE scaling with equal low and high frequency factors.
    "scout": {
        **BASE,
        "interleave_moe_layer_step": 1,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 16.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                            "original_max_position_embeddings": 16},
    },  # fmt: skip
    # Maverick: no QK norm.
    "maverick": {**BASE, "use_qk_norm": False},
    # No temperature tuning; NoPE on layers 0 and 2, whole-sequence attention everywhere.
    "plain_nope": {**BASE, "attn_temperature_tuning": False, "attention_chunk_size": None,
                   "no_rope_layers": [0, 1, 0, 1]},
}  # fmt: skip
