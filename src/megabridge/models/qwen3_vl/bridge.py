"""Qwen3-VL (Qwen3VLForConditionalGeneration): Qwen3's language model with interleaved
M-RoPE and DeepStack, behind a ViT (tower.py). The language model's tensors are Qwen3's
under ``model.language_model.``; the tower's blocks are Megatron-Core layers
(``vision.blocks.N.``, conversion/vit.py), the rest of it keeps its HF names under
``vision.`` instead of ``model.visual.``."""

from megabridge.conversion import vit
from megabridge.conversion.family import read_qwen_vl, write_qwen_vl
from megabridge.conversion.mappings import hf_moved, renames
from megabridge.conversion.registry import register_bridge
from megabridge.models.qwen3.bridge import Qwen3Bridge

# HF vision_config fields the tower is built from (ModelConfig.vision keeps them).
VISION_FIELDS = (
    "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings",
    "deepstack_visual_indexes", "hidden_act",
)  # fmt: skip
_LINEAR = ("weight", "bias")
MERGER_TENSORS = tuple(f"{m}.{t}" for m in ("norm", "linear_fc1", "linear_fc2") for t in _LINEAR)
TOWER_TENSORS = (
    "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight",
    *(f"merger.{t}" for t in MERGER_TENSORS),
    *(f"deepstack_merger_list.*.{t}" for t in MERGER_TENSORS),
)  # fmt: skip
# the blocks: Megatron-Core layers (conversion/vit.py); the rest keeps its HF names
TOWER_MAPPINGS = [
    *renames({f"vision.{t}": f"model.visual.{t}" for t in TOWER_TENSORS}),
    *vit.qwen3_vit_layers("model.visual.blocks"),
]
# Where the language model's tensors live in the checkpoint (text-only Qwen3: model.*).
HF_LANGUAGE_MODEL = "model.language_model."


@register_bridge
class Qwen3VLBridge(Qwen3Bridge):
    """Qwen3 plus interleaved M-RoPE and DeepStack, with a vision tower in front."""

    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    hf_model_type = "qwen3_vl"
    NAME = "Qwen3-VL"
    VISION = True
    HF_FIXED = dict(hidden_act="silu", attention_bias=False)  # no sliding-window fields
    MAPPINGS = [*hf_moved(Qwen3Bridge.MAPPINGS, "model.", HF_LANGUAGE_MODEL), *TOWER_MAPPINGS]
    PARALLELISM = ("TP", "PP")
    NOTES = (
        "images and video (as frames, timestamps in the text); interleaved M-RoPE; DeepStack "
        "(its layers on the first PP stage); the vision tower's blocks split over TP ranks "
        "(patch embedding, positions and mergers replicated), on the first PP stage; SFT and "
        "LoRA (tower blocks too) on images and video frames (padded, not packed yet); freezing "
        "of the language model, tower or merger"
    )

    @classmethod
    def model_config(cls, hf_config):
        cfg = super().model_config(hf_config.text_config)  # the language model, as Qwen3
        read_qwen_vl(
            cls.display_name(), hf_config, cfg, "qwen3_vl", VISION_FIELDS, "gelu_pytorch_tanh"
        )
        # transformers interleaves whatever rope_parameters.mrope_interleaved says
        cfg.mrope_interleaved = True
        return cfg

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        """No sliding-window layers to read (Qwen3-VL's text config has none)."""

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        """None to write either."""

    @classmethod
    def hf_config_dict(cls, cfg):
        data = write_qwen_vl(cls, cfg, super().hf_config_dict(cfg), VISION_FIELDS)
        data["text_config"]["rope_parameters"]["mrope_interleaved"] = True
        return data
