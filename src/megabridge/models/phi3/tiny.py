"""Phi-3's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# Phi3Config's default pad / eos ids (32000) lie outside a tiny vocabulary.
BASE = {**DENSE, "pad_token_id": 0, "eos_token_id": 1}

TINY = {
    # Phi-3-mini-4k: a sliding window (2047 there) shorter than the verify sequences.
    "base": {**BASE, "sliding_window": 8},
    "partial_rotary": {**BASE, "partial_rotary_factor": 0.5},
    # Phi-4-mini: longrope with partial rotary. original_max_position_embeddings (16) is
    # below the verify sequences (32): the long factors, and attention_factor
    # sqrt(1 + ln(128 / 16) / ln(16)); test_family_specifics checks the short ones.
    "longrope": {
        **BASE,
        "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 16,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0, 1.5, 2.0, 3.0],
            "long_factor": [4.0, 6.0, 9.0, 13.0],
        },
    },
}
