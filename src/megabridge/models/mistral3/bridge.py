"""Mistral 3 (Mistral3ForConditionalGeneration: Mistral Small 3.1 / 3.2, Magistral Small):
LLaVA's layout with a Pixtral tower (models/mistral3/tower.py) and a projector that
RMSNorm-s the tower's features and merges each spatial_merge_size^2 patch neighbourhood into
one token before linear - GELU - linear, in front of a language model of a supported text
family (Mistral's in the releases), read with that family's own bridge.

Tensor names as LLaVA's (``language_model.*``, ``vision_tower.*``, ``multi_modal_projector.*``;
transformers 5's ``model.*`` names read too); the tower's layers are Megatron-Core layers
(``vision.blocks.N.``, conversion/vit.py ``pixtral_vit_layers``).
"""

from __future__ import annotations

from megabridge.conversion.registry import bridge_for_model_type, register_bridge
from megabridge.conversion.vit import ACTIVATIONS, pixtral_mappings, read_pixtral
from megabridge.errors import UserError
from megabridge.models.llava.bridge import LlavaBridge

# Top-level Mistral3Config fields, kept in ModelConfig.vision (with the Pixtral tower's).
MISTRAL3_FIELDS = (
    "image_token_id", "projector_hidden_act", "vision_feature_layer",
    "multimodal_projector_bias", "spatial_merge_size",
)  # fmt: skip


@register_bridge
class Mistral3Bridge(LlavaBridge):
    """LLaVA with a Pixtral tower and Mistral 3's merging projector (composed per model)."""

    family = "mistral3"
    architectures = ("Mistral3ForConditionalGeneration",)
    hf_model_type = "mistral3"
    NAME = "Mistral3ForConditionalGeneration"
    FIELDS = MISTRAL3_FIELDS
    PROJECTOR = ("norm.weight", "patch_merger.merging_layer.weight", "linear_1.weight",
                 "linear_1.bias", "linear_2.weight", "linear_2.bias")  # fmt: skip
    NOTES = (
        "Pixtral tower (2D RoPE, each image at its own size, attending within itself) + "
        "patch-merging projector in front of any supported text family (Mistral Small 3.1); "
        "the tower's layers split over TP ranks (patch conv and projector replicated), on "
        "the first PP stage; SFT and LoRA on images (padded)"
    )

    @classmethod
    def vision_mappings(cls, kind):
        return pixtral_mappings(cls.PROJECTOR)

    @classmethod
    def model_config(cls, hf_config):
        name = cls.display_name()
        text_bridge = bridge_for_model_type(hf_config.text_config.model_type, name)
        vision = read_pixtral(name, hf_config.vision_config)
        fields = {f: getattr(hf_config, f) for f in MISTRAL3_FIELDS}
        layer, depth = fields["vision_feature_layer"], vision["num_hidden_layers"]
        # transformers' projector normalises one layer's features: a list cannot run there
        if not isinstance(layer, int) or not -depth - 1 <= layer <= depth:
            raise UserError(
                f"{name} with vision_feature_layer={layer!r} is not supported (one hidden-state "
                f"index of a {depth}-layer tower)"
            )
        if fields["projector_hidden_act"] not in ACTIVATIONS:
            raise UserError(
                f"{name} with projector_hidden_act={fields['projector_hidden_act']!r} is not "
                "supported yet"
            )
        vision |= {"kind": "mistral3",
                   "projector_norm_eps": float(hf_config.text_config.rms_norm_eps)}  # fmt: skip
        return cls.with_language_model(hf_config, text_bridge, {**vision, **fields})
