"""HF architecture name -> family bridge, filled by one decorator per family."""

from __future__ import annotations

import importlib
import pkgutil

import megabridge.models as models_pkg
from megabridge.errors import UserError

_BRIDGES: dict[str, type] = {}

# HF architectures known and refused, with why: converting them would not reproduce
# transformers' numbers with Megatron-Core's modules (bridge_for names the reason).
NOT_SUPPORTED_YET = {
    "PhimoeForCausalLM": (
        "Phi-3.5-MoE routes with sparsemixer (each of its two experts picked from a softmax "
        "over the logits within a jitter margin of the best), which Megatron-Core's top-k "
        "router cannot reproduce"
    ),
    "GraniteMoeForCausalLM": (
        "GraniteMoE stores all experts of a layer in one tensor (block_sparse_moe.input_linear "
        "[experts, 2 * ffn, hidden]); the converter maps one tensor per expert"
    ),
    "Ernie4_5_MoeForCausalLM": (
        "ERNIE 4.5 MoE selects experts by softmax scores plus a correction bias, which "
        "Megatron-Core 0.16 applies to sigmoid routing only, and rotates q/k in interleaved "
        "pairs, which the torch layer spec does not"
    ),
}


def register_bridge(cls: type) -> type:
    """Class decorator: make ``cls`` the bridge for each of its ``architectures``."""
    for arch in cls.architectures:
        if arch in _BRIDGES and _BRIDGES[arch] is not cls:
            raise RuntimeError(
                f"{arch} is registered twice ({_BRIDGES[arch].__name__}, {cls.__name__})"
            )
        _BRIDGES[arch] = cls
    return cls


def _import_families() -> None:
    for info in pkgutil.iter_modules(models_pkg.__path__):
        if info.ispkg:
            try:
                importlib.import_module(f"megabridge.models.{info.name}.bridge")
            except ModuleNotFoundError as e:
                if e.name != f"megabridge.models.{info.name}.bridge":
                    raise


def bridges() -> dict[str, type]:
    """Every registered architecture -> its bridge class."""
    _import_families()
    return dict(sorted(_BRIDGES.items()))


def bridge_for(architecture: str) -> type:
    table = bridges()
    if architecture in NOT_SUPPORTED_YET:
        raise UserError(
            f"architecture {architecture!r} is not supported yet: {NOT_SUPPORTED_YET[architecture]}"
        )
    if architecture not in table:
        raise UserError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(table)}"
        )
    return table[architecture]


def bridge_for_family(family: str) -> type:
    for cls in bridges().values():
        if cls.family == family:
            return cls
    families = sorted({c.family for c in bridges().values()})
    raise UserError(f"model family {family!r} has no HF bridge; families: {', '.join(families)}")


def bridge_for_model_type(model_type: str, within: str) -> type:
    """The text family whose HF ``model_type`` this is (the language model of a multimodal
    ``within``); one line naming the supported ones otherwise."""
    text = {c.hf_model_type: c for c in bridges().values() if not c.VISION}
    text.update({a: c for c in bridges().values() if not c.VISION for a in c.HF_MODEL_TYPE_ALIASES})
    if model_type not in text:
        raise UserError(
            f"{within} with a {model_type!r} language model is not supported yet; supported: "
            f"{', '.join(sorted(text))}"
        )
    return text[model_type]


def text_reader_for(architecture: str) -> tuple[type, object] | None:
    """The text family that reads a multimodal ``architecture``'s language model, and its
    TextTower (family.py); None if no family does."""
    for cls in dict.fromkeys(bridges().values()):
        tower = cls.text_tower(architecture)
        if tower is not None:
            return cls, tower
    return None
