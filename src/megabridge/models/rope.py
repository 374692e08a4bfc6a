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

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


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
    if kind == "longrope":  # the short factors: sequences up to original_max_position_embeddings
        return _longrope_inv_freq(dim, base, params["short_factor"])
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
    if rope_type(params) == "longrope":
        _switch_longrope_factors(emb, dim, cfg.rotary_base, params)


# ------------------------------------------------------------ longrope (Phi-3 128k, Phi-4-mini)


def _longrope_inv_freq(dim: int, base: float, factors) -> torch.Tensor:
    import torch

    # transformers' formula term for term (1 / (factor * base**x)), so the fp32 values agree.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)


def longrope_attention_scaling(params: dict, max_position_embeddings: int) -> float:
    """What transformers multiplies longrope's cos and sin by (its attention_factor):
    given, or sqrt(1 + ln(factor) / ln(original max)) with factor = max / original max."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _switch_longrope_factors(emb: torch.nn.Module, dim: int, base: float, params: dict) -> None:
    """Pick longrope's factors per forward, as transformers does: the long ones when the
    sequence (its longest segment, when packed) is longer than original_max_position_embeddings.

    Megatron-Core's RotaryEmbedding.forward(max_seq_len, offset, ...) is memoised on its
    arguments; the choice depends on those alone, so every memoised result stays right.
    """
    original = int(params["original_max_position_embeddings"])
    factors = {
        False: emb.inv_freq,
        True: _longrope_inv_freq(dim, base, params["long_factor"]).to(emb.inv_freq.device),
    }

    def pick(module, args, kwargs):
        seq_len = args[0] if args else kwargs["max_seq_len"]
        offset = args[1] if len(args) > 1 else kwargs.get("offset", 0)
        long = seq_len + offset > original
        factors[long] = factors[long].to(module.inv_freq.device)  # moved once, kept there
        module.inv_freq = factors[long]

    emb.register_forward_pre_hook(pick, with_kwargs=True)
