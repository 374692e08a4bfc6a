"""Phi-3's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# Phi3Config's default pad / eos ids (32000) lie outside a tiny vocabulary.
BASE = {**DENSE, "pad_token_id": 0, "eos_token_id": 1}

TINY = {
    # Phi-3-mini-4k: a sliding window (2047 there) shorter than the verify sequences.
    "base": {**BASE, "sliding_window": 8},
    "partial_rotary": {**BASE, "partial_rotary_factor": 0.5},
}
