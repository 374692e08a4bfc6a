"""SmolLM3's tiny test models (see conversion/tiny.py).

Four layers, NoPE on the last (transformers' every 4th), so that at PP=2 the second
stage must know its second layer skips RoPE.
"""

from megabridge.conversion.tiny import DENSE

# The default special tokens (128000-128004) are beyond the tiny vocabulary.
BASE = {**DENSE, "num_hidden_layers": 4, "tie_word_embeddings": True, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}  # fmt: skip

TINY = {
    "base": BASE,
    # NoPE on layers 0 and 2, windows (8 < the verify sequences) on the NoPE layers
    "nope_02_windowed": {**BASE, "no_rope_layers": [0, 1, 0, 1], "use_sliding_window": True,
                         "sliding_window": 8, "tie_word_embeddings": False},
}  # fmt: skip
