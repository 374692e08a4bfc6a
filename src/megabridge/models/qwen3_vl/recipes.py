"""Qwen3-VL recipes: SFT and LoRA on chat JSONL with images (dataset.type=sft, padded).

Point checkpoint.pretrained_checkpoint at the local HF folder (its processor renders the
data); the architecture is then read from it. DeepStack's LM layers must sit on the first
pipeline stage."""

from megabridge.models.qwen3_vl import tiny
from megabridge.models.qwen3_vl.bridge import Qwen3VLBridge
from megabridge.recipes import as_lora, sized, tiny_vlm_finetune, vlm_finetune

TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
              vision_end_token_id=151653)  # fmt: skip
ROPE = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
        "mrope_interleaved": True}  # fmt: skip
# The ViT of every Qwen3-VL release (27 blocks, DeepStack from 8, 16, 24); out_hidden_size is
# the language model's hidden size.
VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
              deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")  # fmt: skip
# HF config.json fields of each size (nested as released); tests/data/hf_configs/<size>.json.
SIZES = {
    "qwen3_vl_8b": dict(
        text_config=dict(num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=262144,
                         rope_parameters=ROPE),
        vision_config=dict(VISION, out_hidden_size=4096), tie_word_embeddings=False, **TOKENS,
    ),
}  # fmt: skip


def qwen3_vl_tiny_finetune_config():
    """A tiny Qwen3-VL (tests, smoke runs): set checkpoint.pretrained_checkpoint, dataset.path."""
    return tiny_vlm_finetune("qwen3_vl_tiny_sft", sized(Qwen3VLBridge, tiny.TINY["base"]))


def qwen3_vl_tiny_lora_config():
    """LoRA of the tiny Qwen3-VL's language model (tests, smoke runs)."""
    return as_lora(qwen3_vl_tiny_finetune_config(), "qwen3_vl_tiny_lora")


def qwen3_vl_8b_finetune_config():
    """SFT of Qwen3-VL 8B (TP=2, the tower replicated): set checkpoint.pretrained_checkpoint
    and dataset.path."""
    cfg = vlm_finetune("qwen3_vl_8b_sft", sized(Qwen3VLBridge, SIZES["qwen3_vl_8b"]))
    cfg.model.tensor_model_parallel_size = 2
    return cfg


def qwen3_vl_8b_lora_config():
    """LoRA of Qwen3-VL 8B's language model on one GPU (vision tower frozen)."""
    cfg = as_lora(qwen3_vl_8b_finetune_config(), "qwen3_vl_8b_lora")
    cfg.model.tensor_model_parallel_size = 1  # frozen weights and adapters fit one GPU
    return cfg
