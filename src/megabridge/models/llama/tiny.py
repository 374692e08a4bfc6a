"""Llama's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import DENSE

# Llama 3.1 / 3.2 rope scaling: low frequencies stretched 8x, high ones kept.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip

TINY = {
    "base": DENSE,  # Llama 2
    # Llama 3.2 1B / 3B: output layer tied to the embedding, llama3 rope scaling.
    "tied_llama3_rope": {**DENSE, "tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
}
