"""LLaVA (LlavaForConditionalGeneration): a CLIP or SigLIP vision tower and a two-layer
projector (models/llava/tower.py) in front of a language model of any supported text family,
read with that family's own bridge. A Pixtral tower (Pixtral-12B in transformers' format) is
Mistral 3's (models/mistral3/tower.py) without its patch merger: every patch is a token.

The language model's tensors are the text family's under ``language_model.`` (the names
transformers writes); the tower's and the projector's keep their HF names under ``vision.``.
Files in transformers' other layouts (``model.language_model.*``, ``lm_head.*``,
``vision_tower.vision_model.*`` as on the Hub) are read too, and export in the first one.
"""

from __future__ import annotations

import functools

from megabridge.conversion.family import FamilyBridge
from megabridge.conversion.registry import bridge_for_family, bridge_for_model_type, register_bridge
from megabridge.conversion.vit import (
    ACTIVATIONS,
    HF_RENAMES,
    language_model,
    pixtral_mappings,
    read_pixtral,
    read_vit,
    tower_mappings,
    write_pixtral,
    write_vit,
)
from megabridge.errors import UserError

# Top-level LlavaConfig fields, kept in ModelConfig.vision as well.
LLAVA_FIELDS = (
    "image_token_id", "projector_hidden_act", "vision_feature_select_strategy",
    "vision_feature_layer", "multimodal_projector_bias", "image_seq_length",
)  # fmt: skip


@register_bridge
class LlavaBridge(FamilyBridge):
    """A vision tower + projector, and a text family's language model (composed per model)."""

    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    hf_model_type = "llava"
    VISION = True
    HF_RENAMES = HF_RENAMES
    PROJECTOR = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
    FIELDS = LLAVA_FIELDS  # the top-level HF config fields ModelConfig.vision keeps
    PARALLELISM = ("TP", "PP")
    NOTES = (
        "CLIP, SigLIP or Pixtral (Pixtral-12B, as Mistral 3's) tower + projector in front of "
        "any supported text family; the tower's layers split over TP ranks (embeddings, norms "
        "and projector replicated), on the first PP stage; SFT and LoRA on images (padded)"
    )

    @classmethod
    def for_model(cls, cfg):
        base = cls.__bases__[0] if "LANGUAGE_FAMILY" in cls.__dict__ else cls
        return _composed(base, bridge_for_family(cfg.vision["text_family"]), cfg.vision["kind"])

    @classmethod
    def vision_mappings(cls, kind: str) -> list:
        """The tower's and the projector's mappings for a tower of ``kind``."""
        if kind == "pixtral":  # Pixtral-12B: its layers are Megatron-Core layers
            return pixtral_mappings(cls.PROJECTOR)
        return tower_mappings(cls.PROJECTOR)

    @classmethod
    def model_config(cls, hf_config):
        text_bridge = bridge_for_model_type(hf_config.text_config.model_type, cls.display_name())
        pixtral = hf_config.vision_config.model_type == "pixtral"
        if pixtral:
            vit = read_pixtral(cls.display_name(), hf_config.vision_config)
        else:
            vit = read_vit(cls, hf_config.vision_config)
        llava = {name: getattr(hf_config, name) for name in LLAVA_FIELDS}
        if llava["vision_feature_select_strategy"] not in ("default", "full"):
            raise UserError(
                f"{cls.display_name()} with vision_feature_select_strategy="
                f"{llava['vision_feature_select_strategy']!r} is not supported (default, full)"
            )
        layers = llava["vision_feature_layer"]
        depth = vit["num_hidden_layers"]
        listed = [layers] if isinstance(layers, int) else list(layers)
        if not listed or not all(isinstance(i, int) and -depth - 1 <= i <= depth for i in listed):
            raise UserError(
                f"{cls.display_name()} with vision_feature_layer={layers!r} is not supported "
                f"(hidden-state indices of a {depth}-layer tower)"
            )
        if llava["projector_hidden_act"] not in ACTIVATIONS:
            raise UserError(
                f"{cls.display_name()} with projector_hidden_act="
                f"{llava['projector_hidden_act']!r} is not supported yet"
            )
        llava["vision_feature_layer"] = layers if isinstance(layers, int) else listed
        if pixtral and (
            not isinstance(layers, int) or llava["vision_feature_select_strategy"] != "full"
        ):
            raise UserError(
                f"{cls.display_name()} with a Pixtral tower is supported with one "
                f"vision_feature_layer and vision_feature_select_strategy='full' (Pixtral-12B's)"
            )
        return cls.with_language_model(
            hf_config, text_bridge, {"kind": "pixtral" if pixtral else "llava", **vit, **llava}
        )

    @classmethod
    def with_language_model(cls, hf_config, text_bridge, vision: dict):
        """The language model's ModelConfig (read by ``text_bridge``) as this family's, with
        ``vision`` (plus the text family and width) as its ModelConfig.vision."""
        cfg = text_bridge.model_config(hf_config.text_config)
        cfg.family = cls.family
        # transformers reads the top-level flag (set from text_config's when that one ties)
        cfg.share_embeddings_and_output_weights = bool(hf_config.tie_word_embeddings)
        cfg.vision = {"text_family": text_bridge.family, "text_hidden_size": cfg.hidden_size,
                      **vision}  # fmt: skip
        return cfg

    @classmethod
    def hf_config_dict(cls, cfg):
        text_bridge = bridge_for_family(cfg.vision["text_family"])
        text = text_bridge.hf_config_dict(cfg)
        del text["architectures"]
        tie = cfg.share_embeddings_and_output_weights
        text["tie_word_embeddings"] = tie
        fields = {k: cfg.vision[k] for k in cls.FIELDS if k != "image_token_id"}
        write_tower = write_vit if cfg.vision["kind"] == "llava" else write_pixtral
        return {
            "architectures": [cls.architectures[0]],
            "model_type": cls.hf_model_type,
            "text_config": text,
            "vision_config": write_tower(cfg.vision),
            "image_token_index": cfg.vision["image_token_id"],
            "tie_word_embeddings": tie,
            **fields,
        }


@functools.cache
def _composed(bridge: type[LlavaBridge], text: type[FamilyBridge], kind: str) -> type[LlavaBridge]:
    """``bridge`` with ``text``'s language model: its mappings under ``language_model.``,
    then the tower's and the projector's (a tower of ``kind``)."""
    mappings = [*language_model(text.MAPPINGS), *bridge.vision_mappings(kind)]
    name = f"{bridge.__name__}[{text.family}]"
    body = {"MAPPINGS": mappings, "IGNORED_HF": text.IGNORED_HF, "LANGUAGE_FAMILY": text}
    return type(name, (bridge,), body)
