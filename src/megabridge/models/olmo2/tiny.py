"""OLMo 2's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

BASE = {**DENSE, "eos_token_id": 1}

TINY = {
    "base": BASE,  # OLMo 2 32B: grouped query heads
    "mha": {**BASE, "num_key_value_heads": 4},  # OLMo 2 7B / 13B: k_norm as wide as q_norm
}
