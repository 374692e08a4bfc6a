"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): Qwen2's language model with M-RoPE
behind a windowed ViT (models/vision.py). The tower's blocks are Megatron-Core layers
(``vision.blocks.N.``, conversion/vit.py ``qwen_vit_layers``); its patch embedding and merger
keep their HF names under ``vision.`` instead of ``visual.``; the language model's are Qwen2's."""

from megabridge.conversion import vit
from megabridge.conversion.family import read_qwen_vl, write_qwen_vl
from megabridge.conversion.mappings import renames
from megabridge.conversion.registry import register_bridge
from megabridge.models.qwen2.bridge import Qwen2Bridge

# HF vision_config fields the tower is built from (ModelConfig.vision keeps them).
VISION_FIELDS = (
    "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size",
    "fullatt_block_indexes", "hidden_act", "tokens_per_second",
)  # fmt: skip
TOWER_TENSORS = (
    "patch_embed.proj.weight", "merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
    "merger.mlp.2.weight", "merger.mlp.2.bias",
)  # fmt: skip


@register_bridge
class Qwen25VLBridge(Qwen2Bridge):
    """Qwen2 plus M-RoPE, with a vision tower in front."""

    family = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    hf_model_type = "qwen2_5_vl"
    VISION = True
    MAPPINGS = [
        *Qwen2Bridge.MAPPINGS,
        *renames({f"vision.{t}": f"visual.{t}" for t in TOWER_TENSORS}),
        *vit.qwen_vit_layers("visual.blocks"),
    ]
    PARALLELISM = ("TP", "PP")
    NOTES = (
        "images and video (as frames); M-RoPE; the vision tower's blocks split over TP ranks "
        "(patch embedding and merger replicated), on the first PP stage; SFT and LoRA (tower "
        "blocks too) on images and video frames at TP / PP / DP (padded, not packed yet); "
        "freezing of the language model, tower or merger"
    )

    @classmethod
    def model_config(cls, hf_config):
        cfg = super().model_config(hf_config.text_config)  # the language model, read as Qwen2
        read_qwen_vl(cls.display_name(), hf_config, cfg, "qwen2_5_vl", VISION_FIELDS, "silu")
        return cfg

    @classmethod
    def hf_config_dict(cls, cfg):
        return write_qwen_vl(cls, cfg, super().hf_config_dict(cfg), VISION_FIELDS)
