"""Mistral's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# MistralConfig's default sliding_window is 4096: off unless a variant asks.
BASE = {**DENSE, "sliding_window": None}

TINY = {
    # v0.3 / NeMo: no window; NeMo's head_dim (128) is not hidden / heads (160).
    "base": {**BASE, "head_dim": 32},
    # v0.1: a sliding window (4096 there) shorter than the 32-token verify sequences.
    "window": {**BASE, "sliding_window": 8},
}
