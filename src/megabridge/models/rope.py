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
# YaRN's frequencies are computed here too, but it also scales attention (its attention
# factor): only a family whose bridge resolves that factor reads it (GPT-OSS), so it is
# not one of the types every family may pass through.
YARN = "yarn"


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
    if kind == YARN:
        return _yarn_inv_freq(dim, base, params)
    raise ConfigError(
        f"rope_type {kind!r} is not supported yet (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


# ------------------------------------------------------------ YaRN (GPT-OSS)


def _yarn_inv_freq(dim: int, base: float, params: dict) -> torch.Tensor:
    """YaRN (as transformers' _compute_yarn_parameters): interpolated frequencies below a
    band of dimensions, the original ones above it, a linear ramp between."""
    import torch

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


def yarn_attention_factor(params: dict) -> float:
    """YaRN's factor on cos and sin (transformers' attention_factor; 1 for other rope types).
    A family reading YaRN sets it as rotary_attention_scaling (apply_rope_scaling checks)."""
    if rope_type(params) != YARN:
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
    if rope_type(params) == YARN and cfg.rotary_attention_scaling is None:
        # YaRN's frequencies alone would attend with scores its attention factor**2 too small.
        raise ConfigError(
            "rope_type 'yarn' needs rotary_attention_scaling (YaRN's attention factor), which "
            f"the {cfg.family} bridge does not set: not supported for this family yet"
        )
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
