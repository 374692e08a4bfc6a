"""Granite 3's tiny test models (see conversion/tiny.py).

Every multiplier is far from 1 so that a dropped or misplaced one shows in the logits.
"""

from megabridge.conversion.tiny import DENSE

BASE = {
    **DENSE,
    "embedding_multiplier": 12.0,
    "attention_multiplier": 0.05,  # not 1/sqrt(head_dim) = 0.25
    "residual_multiplier": 0.22,
    # < 1 here: random tiny models have small logits, and a perturbed weight must still
    # move them past verify's threshold (test_verify_rejects_perturbed_weights)
    "logits_scaling": 0.5,
    "tie_word_embeddings": True,
}

TINY = {
    "base": BASE,
    "untied": {**BASE, "tie_word_embeddings": False, "logits_scaling": 8.0,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e7}},
}  # fmt: skip
