"""RoPE frequency scaling as HF configs describe it (rope_scaling / rope_parameters).

Megatron-Core's RotaryEmbedding knows only Llama 3.1's scaling with fixed
constants; here the inverse frequencies are computed from the HF parameters
themselves and set on the built model, so every supported rope type matches
transformers exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megabridge.errors import ConfigError

# torch is imported where frequencies are computed: family bridges import rope_type
# from here, and listing them (`megabridge models`) must not load torch.
if TYPE_CHECKING:
    import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def inv_freq(dim: int, base: float, params: dict) -> torch.Tensor:
    """[dim / 2] inverse frequencies for head dimension ``dim`` (float32)."""
    import torch

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope_type(params)
    if kind == "default":
        return freqs
    if kind == "linear":
        return freqs / float(params["factor"])
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > old_len / low, freqs / factor, freqs)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(
        f"rope_type {kind!r} is not supported yet (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


def apply_rope_scaling(model: torch.nn.Module, cfg) -> None:
    """Replace the built model's inverse frequencies with the HF-exact ones."""
    if cfg.position_embedding_type != "rope":
        return
    params = {k: v for k, v in (cfg.rope_scaling or {}).items() if k != "rope_theta"}
    emb = getattr(model, "rotary_pos_emb", None)
    if emb is None:
        return
    dim = 2 * emb.inv_freq.numel()
    emb.inv_freq = inv_freq(dim, cfg.rotary_base, params).to(emb.inv_freq.device)
