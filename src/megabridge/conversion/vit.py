"""The CLIP / SigLIP vision tower's tables that LLaVA and Gemma 3 share (models/llava/tower.py
builds the tower): which HF vision_config fields ModelConfig.vision keeps, every tensor such
a tower may have, and the names of a multimodal checkpoint's parts in transformers' layouts.
"""

from __future__ import annotations

from megabridge.conversion.mappings import Mapping, hf_moved, renames
from megabridge.errors import UserError

# Stored-name prefix -> the one the mappings use (FamilyBridge.HF_RENAMES): the Hub's llava-hf
# and Gemma 3 files (vision_tower.vision_model.*) and transformers 5's in-memory names
# (model.language_model.*, lm_head.*) read as what transformers 5 writes.
HF_RENAMES = {
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.": "vision_tower.",
    "vision_tower.vision_model.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
}
# A text family's HF names -> the same tensors' inside the multimodal checkpoint.
LANGUAGE_MODEL = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def language_model(mappings: list[Mapping]) -> list[Mapping]:
    """A text family's mappings with their HF names where the multimodal checkpoint keeps them."""
    for prefix, to in LANGUAGE_MODEL.items():
        mappings = hf_moved(mappings, prefix, to)
    return mappings


# The ViT's HF vision_config fields that ModelConfig.vision keeps (what the tower is built from).
VIT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_channels", "image_size", "patch_size", "layer_norm_eps",
    "hidden_act",
)  # fmt: skip
VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu")  # what tower.py builds
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
