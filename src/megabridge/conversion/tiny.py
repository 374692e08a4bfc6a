"""Every family's tiny test models, as data.

A family folder holds ``tiny.py`` with ``TINY``: variant name -> keyword arguments of
the family's transformers config class (found from the bridge's ``hf_model_type``).
Every family has a ``"base"`` variant; the others name what they add (tied embeddings,
rope scaling, a sliding window, another MoE layout ...). The conformance suite
(tests/unit_tests/models/test_conformance.py) runs every variant of every registered
family, so adding a family, or a variant, touches only the family's folder.

A tiny.py may also set ``PERTURB_TENSOR``: a fragment of the name of the HF weight
that the suite scales to check that verify notices (default: the first matrix of
layer 0), for families where scaling that one changes no logit.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from megabridge.conversion.registry import bridge_for_family, bridges

# Two layers, GQA with 2 key/value heads, an even vocabulary: the shape of every dense family.
DENSE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# MoE families: the same attention, top-2 routing; each family sets its expert counts and sizes.
MOE = {**{k: v for k, v in DENSE.items() if k != "intermediate_size"}, "num_experts_per_tok": 2}


def families() -> list[str]:
    """Every registered text-only family, sorted (vision-language ones need images: they
    have their own tests, tests/unit_tests/models/test_vision_language.py)."""
    return sorted({cls.family for cls in bridges().values() if not cls.VISION})


def tiny_module(family: str) -> ModuleType:
    return importlib.import_module(f"megabridge.models.{family}.tiny")


def variants(family: str) -> dict[str, dict]:
    """The family's TINY table: variant name -> config keyword arguments."""
    return tiny_module(family).TINY


def tiny_config(family: str, variant: str = "base", **overrides):
    """The transformers config of one tiny variant, with ``overrides`` on top."""
    from transformers import AutoConfig

    table = variants(family)
    if variant not in table:
        raise ValueError(f"{family} has no tiny variant {variant!r}; it has: {', '.join(table)}")
    bridge = bridge_for_family(family)
    kwargs = {"architectures": [bridge.architectures[0]], **table[variant], **overrides}
    return AutoConfig.for_model(bridge.hf_model_type, **kwargs)
