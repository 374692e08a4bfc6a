"""LLaVA (LlavaForConditionalGeneration): a CLIP or SigLIP vision tower and a two-layer
projector (models/llava/tower.py) in front of a language model of any supported text family,
read with that family's own bridge.

The language model's tensors are the text family's under ``language_model.`` (the names
transformers writes); the tower's and the projector's keep their HF names under ``vision.``.
Files in transformers' other layouts (``model.language_model.*``, ``lm_head.*``,
``vision_tower.vision_model.*`` as on the Hub) are read too, and export in the first one.
"""

from __future__ import annotations

import functools

from megabridge.conversion.family import FamilyBridge
from megabridge.conversion.mappings import hf_prefixed, renames
from megabridge.conversion.registry import bridge_for_family, bridge_for_model_type, register_bridge
from megabridge.errors import UserError

# The ViT's HF vision_config fields that ModelConfig.vision keeps (what the tower is built from).
VIT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_channels", "image_size", "patch_size", "layer_norm_eps",
    "hidden_act",
)  # fmt: skip
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")  # what tower.py builds
# Top-level LlavaConfig fields, kept in ModelConfig.vision as well.
LLAVA_FIELDS = (
    "image_token_id", "projector_hidden_act", "vision_feature_select_strategy",
    "vision_feature_layer", "multimodal_projector_bias", "image_seq_length",
)  # fmt: skip
_LAYER = (
    "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
    *(f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")),
    "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip
# Every tensor a CLIP or SigLIP tower may have (a model holds the ones of its kind).
VIT_TENSORS = (
    "embeddings.class_embedding", "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias", "embeddings.position_embedding.weight",
    "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias",
    *(f"encoder.layers.*.{t}" for t in _LAYER),
    # SigLIP's pooling head (vision_use_head): carried, never run
    "head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias",
    "head.attention.out_proj.weight", "head.attention.out_proj.bias", "head.layernorm.weight",
    "head.layernorm.bias", "head.mlp.fc1.weight", "head.mlp.fc1.bias", "head.mlp.fc2.weight",
    "head.mlp.fc2.bias",
)  # fmt: skip


def tower_mappings(projector: tuple[str, ...]) -> list:
    """The tower's and the projector's tensors: HF name <-> the same under ``vision.``."""
    names = [f"vision_tower.{t}" for t in VIT_TENSORS] + [
        f"multi_modal_projector.{t}" for t in projector
    ]
    return renames({f"vision.{n}": n for n in names})


def read_vit(cls, v) -> dict:
    """ModelConfig.vision's ViT fields from an HF vision_config; refused in one line if
    tower.py cannot build it."""
    if v.model_type not in VISION_MODEL_TYPES:
        raise UserError(
            f"{cls.display_name()} with a {v.model_type!r} vision tower is not supported yet"
        )
    if v.hidden_act not in ACTIVATIONS:
        raise UserError(
            f"{cls.display_name()} with vision hidden_act={v.hidden_act!r} is not supported yet"
        )
    vit = {name: getattr(v, name) for name in VIT_FIELDS}
    if v.model_type == "siglip_vision_model":
        vit["vision_use_head"] = bool(v.vision_use_head)
    return vit


def write_vit(vision: dict) -> dict:
    return {k: vision[k] for k in (*VIT_FIELDS, "vision_use_head") if k in vision}


@register_bridge
class LlavaBridge(FamilyBridge):
    """A vision tower + projector, and a text family's language model (composed per model)."""

    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    hf_model_type = "llava"
    VISION = True
    HF_RENAMES = {
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
        "model.vision_tower.": "vision_tower.",
        "vision_tower.vision_model.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
    }
    LANGUAGE_MODEL = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
    PROJECTOR = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
    PARALLELISM = ("TP", "PP")
    NOTES = (
        "CLIP or SigLIP tower + projector in front of any supported text family; the tower "
        "is a torch module replicated on every TP rank, on the first PP stage; training not "
        "supported yet"
    )

    @classmethod
    def for_model(cls, cfg):
        base = cls.__bases__[0] if "LANGUAGE_FAMILY" in cls.__dict__ else cls
        return _composed(base, bridge_for_family(cfg.vision["text_family"]))

    @classmethod
    def model_config(cls, hf_config):
        text_bridge = bridge_for_model_type(hf_config.text_config.model_type, cls.display_name())
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
        cfg = text_bridge.model_config(hf_config.text_config)
        cfg.family = cls.family
        # transformers reads the top-level flag (set from text_config's when that one ties)
        cfg.share_embeddings_and_output_weights = bool(hf_config.tie_word_embeddings)
        cfg.vision = {
            "kind": "llava", "text_family": text_bridge.family,
            "text_hidden_size": cfg.hidden_size, **vit, **llava,
        }  # fmt: skip
        return cfg

    @classmethod
    def hf_config_dict(cls, cfg):
        text_bridge = bridge_for_family(cfg.vision["text_family"])
        text = text_bridge.hf_config_dict(cfg)
        del text["architectures"]
        tie = cfg.share_embeddings_and_output_weights
        text["tie_word_embeddings"] = tie
        llava = {k: cfg.vision[k] for k in LLAVA_FIELDS if k != "image_token_id"}
        return {
            "architectures": [cls.architectures[0]],
            "model_type": cls.hf_model_type,
            "text_config": text,
            "vision_config": write_vit(cfg.vision),
            "image_token_index": cfg.vision["image_token_id"],
            "tie_word_embeddings": tie,
            **llava,
        }


@functools.cache
def _composed(bridge: type[LlavaBridge], text: type[FamilyBridge]) -> type[LlavaBridge]:
    """``bridge`` with ``text``'s language model: its mappings under ``LANGUAGE_MODEL``'s
    prefixes, then the tower's and the projector's."""
    mappings = [
        *hf_prefixed(text.MAPPINGS, bridge.LANGUAGE_MODEL),
        *tower_mappings(bridge.PROJECTOR),
    ]
    name = f"{bridge.__name__}[{text.family}]"
    body = {"MAPPINGS": mappings, "IGNORED_HF": text.IGNORED_HF, "LANGUAGE_FAMILY": text}
    return type(name, (bridge,), body)
