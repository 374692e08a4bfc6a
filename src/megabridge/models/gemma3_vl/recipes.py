"""Gemma 3 multimodal (text + SigLIP) recipes: SFT and LoRA on chat JSONL with images
(dataset.type=sft, padded; the processor resizes every image to the tower's size). Point
checkpoint.pretrained_checkpoint at the local HF folder (its processor renders the data).
To fine-tune the language model alone, the gemma3 recipes read a
Gemma3ForConditionalGeneration checkpoint text-only."""

from megabridge.models.gemma3_vl import tiny
from megabridge.models.gemma3_vl.bridge import Gemma3VLBridge
from megabridge.recipes import as_lora, sized, tiny_vlm_finetune, vlm_finetune

# SigLIP So400m at 896 x 896 (patches of 14, pooled to 256 image tokens), as released
_VISION = dict(model_type="siglip_vision_model", hidden_size=1152, image_size=896,
               intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
               patch_size=14, vision_use_head=False)  # fmt: skip
_TOKENS = dict(boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
               mm_tokens_per_image=256)  # fmt: skip
_LINEAR_8 = {"factor": 8.0, "rope_type": "linear"}
# HF config.json fields of each size (text_config as released: transformers' Gemma 3 text
# defaults fill the rest); tests/data/hf_configs/<size>.json is the released one.
SIZES = {
    "gemma3_vl_4b": dict(_TOKENS, vision_config=_VISION, text_config=dict(
        model_type="gemma3_text", hidden_size=2560, intermediate_size=10240,
        num_hidden_layers=34, rope_scaling=_LINEAR_8, sliding_window=1024)),
    "gemma3_vl_12b": dict(_TOKENS, vision_config=_VISION, text_config=dict(
        model_type="gemma3_text", hidden_size=3840, intermediate_size=15360,
        num_attention_heads=16, num_hidden_layers=48, num_key_value_heads=8,
        rope_scaling=_LINEAR_8, sliding_window=1024)),
    "gemma3_vl_27b": dict(_TOKENS, vision_config=_VISION, text_config=dict(
        model_type="gemma3_text", head_dim=128, hidden_size=5376, intermediate_size=21504,
        num_attention_heads=32, num_hidden_layers=62, num_key_value_heads=16,
        query_pre_attn_scalar=168, rope_scaling=_LINEAR_8, sliding_window=1024)),
}  # fmt: skip


def gemma3_vl_tiny_finetune_config():
    """A tiny Gemma 3 with images (tests, smoke runs): set checkpoint.pretrained_checkpoint,
    dataset.path."""
    return tiny_vlm_finetune("gemma3_vl_tiny_sft", sized(Gemma3VLBridge, tiny.TINY["base"]))


def gemma3_vl_tiny_lora_config():
    """LoRA of the tiny Gemma 3's language model (tests, smoke runs)."""
    return as_lora(gemma3_vl_tiny_finetune_config(), "gemma3_vl_tiny_lora")


def gemma3_vl_4b_finetune_config():
    """SFT of Gemma 3 4B with images, on one GPU: set checkpoint.pretrained_checkpoint and
    dataset.path."""
    return vlm_finetune("gemma3_vl_4b_sft", sized(Gemma3VLBridge, SIZES["gemma3_vl_4b"]))


def gemma3_vl_4b_lora_config():
    """LoRA of Gemma 3 4B's language model on one GPU (vision tower frozen)."""
    return as_lora(gemma3_vl_4b_finetune_config(), "gemma3_vl_4b_lora")


def gemma3_vl_12b_finetune_config():
    """SFT of Gemma 3 12B with images, TP=4 on 4 GPUs."""
    cfg = vlm_finetune("gemma3_vl_12b_sft", sized(Gemma3VLBridge, SIZES["gemma3_vl_12b"]))
    cfg.model.tensor_model_parallel_size = 4
    return cfg


def gemma3_vl_27b_finetune_config():
    """SFT of Gemma 3 27B with images, TP=8 on 8 GPUs."""
    cfg = vlm_finetune("gemma3_vl_27b_sft", sized(Gemma3VLBridge, SIZES["gemma3_vl_27b"]))
    cfg.model.tensor_model_parallel_size = 8
    return cfg
