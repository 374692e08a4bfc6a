"""Qwen3-VL (Qwen3VLForConditionalGeneration): Qwen3's language model with interleaved
M-RoPE and DeepStack, behind a ViT (tower.py). The language model's tensors are Qwen3's
under ``model.language_model.``; the tower's keep their HF names, under ``vision.``
instead of ``model.visual.``."""

from megabridge.conversion.mappings import hf_moved, renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.qwen3.bridge import Qwen3Bridge

# HF vision_config fields the tower is built from (ModelConfig.vision keeps them).
VISION_FIELDS = (
    "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "num_position_embeddings",
    "deepstack_visual_indexes", "hidden_act",
)  # fmt: skip
# Top-level token ids of config.json (the vision dict carries them through a checkpoint).
TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_LINEAR = ("weight", "bias")
BLOCK_TENSORS = tuple(
    f"{module}.{t}" for module in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1",
                                   "mlp.linear_fc2") for t in _LINEAR
)  # fmt: skip
MERGER_TENSORS = tuple(f"{m}.{t}" for m in ("norm", "linear_fc1", "linear_fc2") for t in _LINEAR)
TOWER_TENSORS = (
    "patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight",
    *(f"blocks.*.{t}" for t in BLOCK_TENSORS),
    *(f"merger.{t}" for t in MERGER_TENSORS),
    *(f"deepstack_merger_list.*.{t}" for t in MERGER_TENSORS),
)  # fmt: skip
TOWER_MAPPINGS = renames({f"vision.{t}": f"model.visual.{t}" for t in TOWER_TENSORS})
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
        "images (no video yet); interleaved M-RoPE; DeepStack (its layers on the first PP "
        "stage); the vision tower is a torch module replicated on every TP rank, on the first "
        "PP stage; training not supported yet"
    )

    @classmethod
    def model_config(cls, hf_config):
        text = hf_config.text_config
        cfg = super().model_config(text)  # the language model, read as the text family
        cfg.position_embedding_type = "mrope"
        cfg.mrope_section = list(text.rope_parameters["mrope_section"])
        # transformers interleaves whatever rope_parameters.mrope_interleaved says
        cfg.mrope_interleaved = True
        # transformers 5 ties at the top level (4.x files put it in text_config too)
        cfg.share_embeddings_and_output_weights = bool(hf_config.tie_word_embeddings)
        v = hf_config.vision_config
        vision = {name: getattr(v, name) for name in VISION_FIELDS}
        if vision["hidden_act"] != "gelu_pytorch_tanh":  # what tower.py builds
            raise UserError(
                f"{cls.display_name()} with vision hidden_act={v.hidden_act!r} is not supported yet"
            )
        vision["deepstack_visual_indexes"] = list(vision["deepstack_visual_indexes"])
        vision["rope_theta"] = float((v.rope_parameters or {}).get("rope_theta", 10000.0))
        vision.update({name: getattr(hf_config, name) for name in TOKEN_IDS})
        cfg.vision = {"kind": "qwen3_vl", **vision}
        return cfg

    @classmethod
    def adjust_model_config(cls, hf_config, cfg):
        """No sliding-window layers to read (Qwen3-VL's text config has none)."""

    @classmethod
    def adjust_hf_config(cls, cfg, data):
        """None to write either."""

    @classmethod
    def hf_config_dict(cls, cfg):
        text = super().hf_config_dict(cfg)
        for key in ("architectures", "model_type"):
            del text[key]
        tie = text.pop("tie_word_embeddings")
        text["rope_parameters"].update(
            mrope_section=list(cfg.mrope_section), mrope_interleaved=True
        )
        vision = {k: v for k, v in cfg.vision.items() if k in VISION_FIELDS}
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": cfg.vision["rope_theta"]}
        return {
            "architectures": [cls.architectures[0]],
            "model_type": cls.hf_model_type,
            "text_config": {**text, "model_type": f"{cls.hf_model_type}_text"},
            "vision_config": {**vision, "model_type": f"{cls.hf_model_type}_vision"},
            "tie_word_embeddings": tie,
            **{name: cfg.vision[name] for name in TOKEN_IDS},
        }
