"""RoPE frequency scaling as HF configs describe it (rope_scaling / rope_parameters).

Megatron-Core's RotaryEmbedding knows only Llama 3.1's scaling with fixed
constants; here the inverse frequencies are computed from the HF parameters
themselves and set on the built model, so every supported rope type matches
transformers exactly.
"""

from __future__ import annotations

import math

import torch

from megabridge.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def inv_freq(dim: int, base: float, params: dict) -> torch.Tensor:
    """[dim / 2] inverse frequencies for head dimension ``dim`` (float32)."""
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
    if kind == "yarn":
        return _yarn_inv_freq(dim, base, params)
    raise ConfigError(
        f"rope_type {kind!r} is not supported yet (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


def _yarn_inv_freq(dim: int, base: float, params: dict) -> torch.Tensor:
    """YaRN (as transformers' _compute_yarn_parameters): interpolated frequencies below a
    band of dimensions, the original ones above it, a linear ramp between."""
    factor = float(params["factor"])
    old_len = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def attention_factor(params: dict) -> float:
    """YaRN's factor on cos and sin (1 for every other rope type)."""
    if rope_type(params) != "yarn":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    factor = float(params["factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


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
