"""What every family bridge is: tables, and the code that reads them.

A family (models/<family>/bridge.py) subclasses FamilyBridge and fills in:

* ``CONFIG``: HF config attribute -> ModelConfig field (both directions);
* ``MEGATRON_FIXED`` / ``HF_FIXED``: values the family always has on each side;
* ``MAPPINGS``: the parameter mappings, composed from the blocks in blocks.py;
* ``IGNORED_HF``: HF tensors that carry nothing (e.g. rotary ``inv_freq``);
* ``UNSUPPORTED``: HF config flags that, when set, the family cannot convert yet.

and, only when a field cannot be a table entry, overrides ``adjust_model_config``
/ ``adjust_hf_config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from megabridge.conversion.mappings import Mapping
from megabridge.errors import ConversionError, UserError
from megabridge.models.config import ModelConfig

# Fields most decoder-only HF configs share.
COMMON_CONFIG = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "seq_length",
    "rms_norm_eps": "layernorm_epsilon",
    "tie_word_embeddings": "share_embeddings_and_output_weights",
}

# What a Llama-like decoder always is on the Megatron side.
LLAMA_LIKE = dict(
    normalization="RMSNorm",
    activation="swiglu",
    position_embedding_type="rope",
    add_bias_linear=False,
)


@dataclass(frozen=True)
class TextTower:
    """A multimodal architecture read as its text-only language model: the config under
    ``config_key``, the tensors under the prefixes of ``renames`` (stored prefix -> the
    text-only model's), those under ``ignored`` left out. Its export is text-only."""

    architecture: str
    config_key: str
    renames: dict[str, str]
    ignored: tuple[str, ...]


class FamilyBridge:
    family: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    hf_model_type: ClassVar[str]
    # Other model_types of releases with this architecture that transformers does not
    # know (Kimi-K2's "kimi_k2"): their config.json is read as hf_model_type's.
    HF_MODEL_TYPE_ALIASES: ClassVar[tuple[str, ...]] = ()
    CONFIG: ClassVar[dict[str, str]] = COMMON_CONFIG
    MEGATRON_FIXED: ClassVar[dict[str, Any]] = {}
    HF_FIXED: ClassVar[dict[str, Any]] = {}
    MAPPINGS: ClassVar[list[Mapping]] = []
    IGNORED_HF: ClassVar[tuple[str, ...]] = (r".*\.rotary_emb\.inv_freq$",)
    # HF config flag -> why it cannot be converted yet. A config with the flag set is
    # refused with one line: "<NAME> with <flag>=<value> is not supported yet".
    UNSUPPORTED: ClassVar[dict[str, str]] = {}
    # The family's name in messages (default: its first architecture).
    NAME: ClassVar[str] = ""
    # Multimodal architectures whose language model the family reads (see TextTower).
    TEXT_TOWERS: ClassVar[tuple[TextTower, ...]] = ()
    # The family's models take images (ModelConfig.vision): verify needs --image, training is
    # refused, and the text-only conformance suite leaves them out (they have their own tests).
    VISION: ClassVar[bool] = False
    # Stored-name prefix -> the prefix MAPPINGS use: other layouts of the architecture's files
    # (transformers' older and newer names of one model) read as one (LLaVA).
    HF_RENAMES: ClassVar[dict[str, str]] = {}
    # What `megabridge models` and the README table say about the family.
    PARALLELISM: ClassVar[tuple[str, ...]] = ("TP", "PP")
    NOTES: ClassVar[str] = ""

    # ------------------------------------------------------------ configs

    @classmethod
    def model_config(cls, hf_config) -> ModelConfig:
        """Our ModelConfig from a transformers config object."""
        for flag in cls.UNSUPPORTED:
            value = getattr(hf_config, flag, None)
            if value:
                raise UserError(f"{cls.display_name()} with {flag}={value!r} is not supported yet")
        cfg = ModelConfig(family=cls.family)
        for hf_field, field in cls.CONFIG.items():
            value = getattr(hf_config, hf_field, None)
            if value is not None:
                setattr(cfg, field, value)
        for field, value in cls.MEGATRON_FIXED.items():
            setattr(cfg, field, value)
        rope = dict(
            getattr(hf_config, "rope_parameters", None)
            or getattr(hf_config, "rope_scaling", None)
            or {}
        )
        theta = rope.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None)
        if theta is not None:
            cfg.rotary_base = float(theta)
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            cfg.rope_scaling = rope
        cls.adjust_model_config(hf_config, cfg)
        return cfg

    @classmethod
    def hf_config_dict(cls, cfg: ModelConfig) -> dict:
        """An HF config.json dict for ``cfg`` (for models that did not come from HF)."""
        data: dict[str, Any] = {
            "architectures": [cls.architectures[0]],
            "model_type": cls.hf_model_type,
        }
        for hf_field, field in cls.CONFIG.items():
            value = getattr(cfg, field)
            if value is not None:
                data[hf_field] = value
        data.setdefault("num_key_value_heads", cfg.num_attention_heads)
        data.update(cls.HF_FIXED)
        rope = {"rope_theta": cfg.rotary_base, "rope_type": "default", **cfg.rope_scaling}
        data["rope_parameters"] = rope
        cls.adjust_hf_config(cfg, data)
        return data

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> type[FamilyBridge]:
        """The bridge for this model: itself, or for a family whose tables depend on the
        model (LLaVA: on its language model's family) the bridge composed for it."""
        return cls

    @classmethod
    def text_tower(cls, architecture: str) -> TextTower | None:
        return next((t for t in cls.TEXT_TOWERS if t.architecture == architecture), None)

    @classmethod
    def display_name(cls) -> str:
        return cls.NAME or cls.architectures[0]

    @classmethod
    def adjust_model_config(cls, hf_config, cfg: ModelConfig) -> None:
        """Family-specific fields that are not a plain table entry (default: none)."""

    @classmethod
    def adjust_hf_config(cls, cfg: ModelConfig, data: dict) -> None:
        """Inverse of adjust_model_config for exported config.json (default: none)."""

    # ------------------------------------------------------------ parameters

    @classmethod
    def resolve(cls, megatron_name: str) -> tuple[Mapping, tuple[str, ...]]:
        """The mapping and HF names of a (global) Megatron parameter name."""
        for mapping in cls.MAPPINGS:
            hf_names = mapping.match(megatron_name)
            if hf_names is not None:
                return mapping, hf_names
        raise ConversionError(
            f"{cls.__name__} has no mapping for Megatron parameter {megatron_name!r}"
        )

    @classmethod
    def is_ignored_hf(cls, hf_name: str) -> bool:
        return any(re.match(p, hf_name) for p in cls.IGNORED_HF)

    @classmethod
    def describe(cls) -> dict:
        return {
            "family": cls.family,
            "architectures": list(cls.architectures),
            "parallelism": list(cls.PARALLELISM),
            "notes": cls.NOTES,
        }


# ------------------------------------------------------------ per-layer sliding windows

HF_LAYER_KINDS = ("full_attention", "sliding_attention")


def read_window_layers(name: str, hf_config, cfg: ModelConfig) -> None:
    """Which layers slide, from HF's ``layer_types`` (Qwen2/3 derive it from
    use_sliding_window and max_window_layers: the layers from max_window_layers on)."""
    kinds = list(getattr(hf_config, "layer_types", None) or [])
    unknown = sorted(set(kinds) - set(HF_LAYER_KINDS))
    if unknown:
        raise UserError(f"{name} layer_types {unknown} are not supported yet")
    sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    if sliding and getattr(hf_config, "sliding_window", None):
        cfg.sliding_window = int(hf_config.sliding_window)
        cfg.sliding_window_layers = sliding


def write_window_layers(cfg: ModelConfig, data: dict) -> None:
    """Inverse of read_window_layers, into a config.json dict (Qwen2/3 field names)."""
    sliding = [i for i in range(cfg.num_layers) if cfg.window_of_layer(i) is not None]
    if not sliding:
        data["use_sliding_window"] = False
        return
    data["use_sliding_window"] = True
    data["sliding_window"] = cfg.sliding_window
    # max_window_layers says "from this layer on"; layer_types also covers any other pattern.
    data["max_window_layers"] = sliding[0]
    data["layer_types"] = [HF_LAYER_KINDS[i in sliding] for i in range(cfg.num_layers)]


# ------------------------------------------------------------ Qwen-VL configs (Qwen2.5-VL, Qwen3-VL)

# Top-level token ids of a Qwen-VL config.json (the vision dict carries them through a checkpoint).
QWEN_VL_TOKEN_IDS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"
)  # fmt: skip


def read_qwen_vl(name: str, hf_config, cfg: ModelConfig, kind: str, fields, hidden_act: str):
    """The M-RoPE, tied embeddings and vision tower of a Qwen-VL config into ``cfg`` (its
    language model already read from ``text_config``): ``fields`` of ``vision_config``, the
    tower's RoPE theta and the token ids, as ``cfg.vision`` of tower ``kind``. A tower whose
    activation is not ``hidden_act`` (the one the tower builds) is refused."""
    text, v = hf_config.text_config, hf_config.vision_config
    cfg.position_embedding_type = "mrope"
    cfg.mrope_section = list(text.rope_parameters["mrope_section"])
    # transformers 5 ties at the top level (4.x files put it in text_config, read there too)
    cfg.share_embeddings_and_output_weights = bool(hf_config.tie_word_embeddings)
    vision = {f: list(getattr(v, f)) if f.endswith("_indexes") else getattr(v, f) for f in fields}
    if vision["hidden_act"] != hidden_act:
        raise UserError(f"{name} with vision hidden_act={v.hidden_act!r} is not supported yet")
    vision["rope_theta"] = float((v.rope_parameters or {}).get("rope_theta", 10000.0))
    vision.update({token: getattr(hf_config, token) for token in QWEN_VL_TOKEN_IDS})
    cfg.vision = {"kind": kind, **vision}


def write_qwen_vl(cls, cfg: ModelConfig, text: dict, fields) -> dict:
    """Inverse of read_qwen_vl: the config.json dict around ``text`` (the language model's,
    as its text family writes it)."""
    for key in ("architectures", "model_type"):
        del text[key]
    tie = text.pop("tie_word_embeddings")
    text["rope_parameters"]["mrope_section"] = list(cfg.mrope_section)
    vision = {k: v for k, v in cfg.vision.items() if k in fields}
    vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": cfg.vision["rope_theta"]}
    return {
        "architectures": [cls.architectures[0]],
        "model_type": cls.hf_model_type,
        "text_config": {**text, "model_type": f"{cls.hf_model_type}_text"},
        "vision_config": {**vision, "model_type": f"{cls.hf_model_type}_vision"},
        "tie_word_embeddings": tie,
        **{token: cfg.vision[token] for token in QWEN_VL_TOKEN_IDS},
    }
