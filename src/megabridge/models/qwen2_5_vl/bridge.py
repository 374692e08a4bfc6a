"""Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): Qwen2's language model with M-RoPE
behind a windowed ViT (models/vision.py). The tower's tensors keep their HF names, under
``vision.`` instead of ``visual.``; the language model's are Qwen2's."""

from megabridge.conversion.mappings import renames
from megabridge.conversion.registry import register_bridge
from megabridge.errors import UserError
from megabridge.models.qwen2.bridge import Qwen2Bridge

# HF vision_config fields the tower is built from (ModelConfig.vision keeps them).
VISION_FIELDS = (
    "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
    "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size",
    "fullatt_block_indexes", "hidden_act", "tokens_per_second",
)  # fmt: skip
# Top-level token ids of config.json (the vision dict carries them through a checkpoint).
TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
BLOCK_TENSORS = (
    "norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight",
    "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias",
)  # fmt: skip
TOWER_TENSORS = (
    "patch_embed.proj.weight", "merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
    "merger.mlp.2.weight", "merger.mlp.2.bias",
    *(f"blocks.*.{t}" for t in BLOCK_TENSORS),
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
    ]
    PARALLELISM = ("TP", "PP")
    NOTES = (
        "images (no video yet); M-RoPE; the vision tower is a torch module replicated on "
        "every TP rank, on the first PP stage; SFT and LoRA on images at TP / PP / DP (padded, "
        "not packed yet); freezing of the language model, tower or merger"
    )

    @classmethod
    def model_config(cls, hf_config):
        text = hf_config.text_config
        cfg = super().model_config(text)  # the language model, read as Qwen2
        cfg.position_embedding_type = "mrope"
        cfg.mrope_section = list(text.rope_parameters["mrope_section"])
        # transformers 5 ties at the top level (4.x files put it in text_config, read there too)
        cfg.share_embeddings_and_output_weights = bool(hf_config.tie_word_embeddings)
        v = hf_config.vision_config
        vision = {name: getattr(v, name) for name in VISION_FIELDS}
        if vision["hidden_act"] != "silu":  # what models/vision.py builds
            raise UserError(
                f"{cls.display_name()} with vision hidden_act={v.hidden_act!r} is not supported yet"
            )
        vision["fullatt_block_indexes"] = list(vision["fullatt_block_indexes"])
        vision["rope_theta"] = float((v.rope_parameters or {}).get("rope_theta", 10000.0))
        vision.update({name: getattr(hf_config, name) for name in TOKEN_IDS})
        cfg.vision = {"kind": "qwen2_5_vl", **vision}
        return cfg

    @classmethod
    def hf_config_dict(cls, cfg):
        text = super().hf_config_dict(cfg)
        for key in ("architectures", "model_type"):
            del text[key]
        tie = text.pop("tie_word_embeddings")
        text["rope_parameters"]["mrope_section"] = list(cfg.mrope_section)
        vision = {k: v for k, v in cfg.vision.items() if k in VISION_FIELDS}
        theta = cfg.vision["rope_theta"]
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": theta}
        return {
            "architectures": [cls.architectures[0]],
            "model_type": cls.hf_model_type,
            "text_config": {**text, "model_type": "qwen2_5_vl_text"},
            "vision_config": {**vision, "model_type": "qwen2_5_vl_vision"},
            "tie_word_embeddings": tie,
            **{name: cfg.vision[name] for name in TOKEN_IDS},
        }
